#!/usr/bin/env bash
# The checks and benchmarks that need a GPU, in one run of a few minutes (what a GPU machine lent for a short while
# can give): the distributed code with nccl, then training and decoding against Hugging Face on the GPU.
#
#   bash scripts/gpu_checks.sh [LOG_DIR] [STEP...]
#
# With STEP names, only those steps run (the names below: distributed_fp32, decode_graph, profile_bf16, ...).
# Needs torch with CUDA, transformers and gin-config; not the input pipeline (seqio, TensorFlow), which none of
# these steps imports. Each step's output goes to LOG_DIR/<step>.log (default gpu_checks/) and to the terminal, with
# its exit status and seconds. With one GPU the distributed check runs one process: nccl and the DDP and FSDP2 code
# paths, not cross-process arithmetic (tests/test_distributed.py checks that with two CPU processes).
set -u
logs=${1:-gpu_checks}
shift $(($# > 0 ? 1 : 0))
only=" $* "
mkdir -p "$logs"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
failed=0

step() {  # step NAME SECONDS COMMAND...: run COMMAND with a time limit, keep its log, report status and time
    local name=$1 limit=$2 began=$SECONDS
    shift 2
    if [ "$only" != "  " ] && [[ "$only" != *" $name "* ]]; then return; fi
    echo "== $name: $*"
    timeout "$limit" "$@" 2>&1 | tee "$logs/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - began)) s"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
step distributed_fp32 120 python3 -m torch.distributed.run --nproc_per_node="$gpus" --master_port=29700 \
    scripts/check_distributed.py
step distributed_bf16 120 python3 -m torch.distributed.run --nproc_per_node="$gpus" --master_port=29701 \
    scripts/check_distributed.py --precision bf16
step decode_graph 120 python3 scripts/check_decode_graph.py
step attention 90 python3 benchmarks/attention_backends.py --device cuda
step attention_packed 90 python3 benchmarks/attention_backends.py --device cuda --packed
step profile_bf16 180 python3 benchmarks/profile_training.py --device cuda --batch 64 --dtype bf16 --top 12 --shapes
step train_eager 240 python3 benchmarks/model_throughput.py --device cuda --batch 64 --rounds 2 --steps 10 \
    --warmup 3 --dtypes bf16,fp32
step decode 150 python3 benchmarks/decode_throughput.py --device cuda --batch 64 --rounds 2 --runs 3 --warmup 1
step decode_b8 150 python3 benchmarks/decode_throughput.py --device cuda --batch 8 --rounds 2 --runs 3 --warmup 1
step train_compiled 300 python3 benchmarks/model_throughput.py --device cuda --batch 64 --rounds 1 --steps 10 \
    --warmup 3 --dtypes bf16 --compile
echo "gpu_checks: $failed step(s) failed"
exit $((failed > 0))
