#!/usr/bin/env bash
# The GPU run of issue #26, sized for about 8 minutes on one H200 (docs/compile.md, "GPU").
#
#   bash docs/gpu-run.sh              on a CUDA machine, from the repository root
#   SMOKE=1 bash docs/gpu-run.sh      anywhere: the same steps on the bundled demo model at
#                                     tiny sizes (fp32, a few tokens), to check the script
#
# Random weights at LLaVA-1.5-7B's widths, all 32 LLM layers, bf16; unpruned and VLM-Pruner,
# eager and compiled side by side in interleaved rounds, at batch 1, 8 and 32:
#   1. 16 new tokens, keep 192 and 64, 3 timed rounds: where the roofline caps the gain.
#   2. 128 new tokens (captioning), keep 64, 2 timed rounds: decode against its floor, compiled
#      against eager. Keep 192 is left out to fit the time; add it with KEEPS_128=192,64.
# Each run writes runtime.json and runtime.md under $OUT after every batch size, so a run cut
# short by its time limit keeps what it measured; progress lines (warm-up and compile seconds)
# go to $OUT/*.log. The first compiled warm-up compiles; inductor's cache makes the second
# run's cheaper. BUDGET_S (default 480) bounds the whole script.
set -euo pipefail

OUT=${OUT:-out/gpu-run}
PYTHON=${PYTHON:-python}
BUDGET_S=${BUDGET_S:-480}
KEEPS_128=${KEEPS_128:-64}
mkdir -p "$OUT"

if [[ ${SMOKE:-0} == 1 ]]; then
  model=(--dtype float32 --device cpu --question-tokens 8)  # the bundled demo model
  batches=1,2
  tokens=(3 4)
  repeats=(1 1)
else
  model=(--shape llava-1.5-7b --layers 32 --dtype bfloat16 --device cuda)
  batches=1,8,32
  tokens=(16 128)
  repeats=(3 2)
fi
common=(runtime "${model[@]}" --methods vlm-pruner --batches "$batches" --compile on --chunks '' --warmup 1)

{
  date -u
  git rev-parse HEAD 2>/dev/null || true
  "$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__)"
  nvidia-smi --query-gpu=name,memory.total,power.limit,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
} > "$OUT/env.txt"

start=$SECONDS
left() { local s=$((BUDGET_S - (SECONDS - start))); echo $((s > 30 ? s : 30)); }  # timeout 0 would mean none

# 1: 16 new tokens; up to 55 % of the budget (it pays the first compile)
timeout $((BUDGET_S * 55 / 100)) "$PYTHON" jobs/benchmark.py "${common[@]}" --keeps 192,64 \
  --new-tokens "${tokens[0]}" --repeats "${repeats[0]}" --out "$OUT/tokens-${tokens[0]}" 2> "$OUT/tokens-${tokens[0]}.log" \
  > /dev/null || echo "run 1 stopped with status $? (see $OUT/tokens-${tokens[0]}.log)" | tee -a "$OUT/env.txt"

# 2: 128 new tokens; whatever is left
timeout "$(left)" "$PYTHON" jobs/benchmark.py "${common[@]}" --keeps "$KEEPS_128" \
  --new-tokens "${tokens[1]}" --repeats "${repeats[1]}" --out "$OUT/tokens-${tokens[1]}" 2> "$OUT/tokens-${tokens[1]}.log" \
  > /dev/null || echo "run 2 stopped with status $? (see $OUT/tokens-${tokens[1]}.log)" | tee -a "$OUT/env.txt"

echo "$((SECONDS - start)) s" >> "$OUT/env.txt"
ls -l "$OUT"/*/runtime.md
