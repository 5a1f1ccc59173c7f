#!/usr/bin/env bash
# The README's main job, on the real data in ../shared/data: set up, train a SentencePiece vocabulary on the tasks'
# text, show one tokenized example per task, then run the demo experiment: pretrain a small T5 on span corruption
# mixed with GLUE and fine-tune it on SST-2, beside SST-2 from scratch; print the report (gin/experiments/demo.gin).
# About 20 minutes on 2 CPU cores (22 measured, with the vocabulary and an environment update).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${MTP_VENV:-$PWD/.venv}"
export MTP_DATA_DIR="${MTP_DATA_DIR:-$PWD/../shared/data}"
OUT="${MTP_DEMO_DIR:-$PWD/demo_output}"
export MTP_VOCAB="${MTP_VOCAB:-$OUT/vocab.model}"
MTP="$VENV/bin/mtp"
"$MTP" tasks list
if [[ ! -f "$MTP_VOCAB" ]]; then
  "$MTP" vocab train --vocab_size=8000 --output="$MTP_VOCAB" --max_examples_per_task=20000 \
    --mixture_or_task=glue_cola,glue_sst2,glue_mrpc,glue_stsb,glue_rte,glue_wnli,squad_v1_devsplit,conll2003_ner,span_corruption
fi
"$MTP" tasks show --split=validation \
  --mixture_or_task=glue_cola,glue_sst2,glue_mrpc,glue_stsb,glue_qnli,glue_rte,glue_wnli,squad_v1_devsplit,conll2003_ner,span_corruption,bert_mlm,iid_denoising,prefix_lm
"$MTP" experiment --gin_file=gin/experiments/demo.gin --gin.EXPERIMENT_DIR="'$OUT'"
