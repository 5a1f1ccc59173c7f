#!/usr/bin/env bash
# The README's main job: set up, train a vocabulary on the real data, print one tokenized example of every task.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${MTP_VENV:-$PWD/.venv}"
export MTP_DATA_DIR="${MTP_DATA_DIR:-$PWD/../shared/data}"
export MTP_VOCAB="${MTP_VOCAB:-$PWD/runs/demo/vocab.model}"
MTP="$VENV/bin/mtp"
"$MTP" tasks list
if [[ ! -f "$MTP_VOCAB" ]]; then
  "$MTP" vocab train --mixture_or_task=glue_cola,glue_sst2,glue_mrpc,glue_stsb,glue_rte,glue_wnli,squad_v1_devsplit,conll2003_ner,span_corruption --vocab_size=8000 --output="$MTP_VOCAB" \
    --max_examples_per_task=20000
fi
for task in glue_cola glue_sst2 glue_mrpc glue_stsb glue_qnli glue_rte glue_wnli squad_v1_devsplit conll2003_ner \
            span_corruption bert_mlm iid_denoising prefix_lm; do
  split=train; [[ $task == glue_qnli ]] && split=validation
  "$MTP" tasks show --mixture_or_task=$task --split=$split
done
