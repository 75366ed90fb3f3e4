#!/usr/bin/env bash
# Train and score the default adapters on the default base (Gemma 3 270M, NF4).
# Usage: scripts/train_default_adapters.sh OUT_DIR [TASK...]   (default: every task)
# Each run writes OUT_DIR/<task>/ (a PEFT adapter with loraplex-adapter.json), then
# OUT_DIR/<task>.eval.json, and GNU time's report (peak RSS) to OUT_DIR/<task>.time.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: $0 OUT_DIR [TASK...]}
shift
tasks=("$@")
[ ${#tasks[@]} -gt 0 ] || tasks=(date-iso json-extract concise short-answer)
mkdir -p "$out"
common=(--rank 8 --alpha 16 --max-length 128 --save-dtype bfloat16 --logging-steps 2 --overwrite)
for task in "${tasks[@]}"; do
  case $task in
    date-iso) args=(--method sft --max-steps 16 --batch-size 8 --learning-rate 2e-3); gen=16; limit=0 ;;
    json-extract) args=(--method sft --max-steps 12 --batch-size 8 --learning-rate 2e-3); gen=40; limit=30 ;;
    concise) args=(--method dpo --max-steps 8 --batch-size 4 --learning-rate 8e-4 --beta 0.1); gen=24; limit=30 ;;
    short-answer) args=(--method sft --max-steps 280 --batch-size 16 --learning-rate 1e-3 --warmup-ratio 0.1
                        --optimizer adamw_torch --rank 16 --alpha 32 --max-length 64 --logging-steps 20)
                  gen=24; limit=0 ;;
    *) echo "unknown task $task" >&2; exit 2 ;;
  esac
  /usr/bin/time -v -o "$out/$task.time.txt" .venv/bin/loraplex train-adapter --task "$task" \
    --output "$out/$task" "${common[@]}" "${args[@]}"
  .venv/bin/loraplex eval-adapter "$out/$task" --task "$task" --max-new-tokens "$gen" --limit "$limit" \
    --output-json "$out/$task.eval.json"
done
