#!/usr/bin/env bash
# Everything issue 30 asks of a GPU, in one run that writes its figures under OUT (a device
# machine has no Rust: build `council` here with `--features cuda`, release, stripped, and carry
# it; the machine has CUDA 13 runtime libraries, PyTorch and transformers).
#
#   COUNCIL=./council scripts/gpu/check.sh OUT          # on the GPU machine (cuda:0)
#   CUDA= SHAPE=tiny scripts/gpu/check.sh /tmp/gpu-dry  # the same steps on this CPU, quickly
#
# Steps, each with its own time limit, each logged to OUT/<step>.txt, the run going on after a
# failed step (OUT/status.txt says which passed):
#   1. correctness: `council dev gpu-check` (bf16 logits, batch invariance, scoring against the
#      CPU f32 engine, Qwen2 and Qwen3);
#   2. speed: a model of Qwen2.5-0.5B's shape (random weights, `dev tiny-model --shape small`),
#      `council dev bench` at batch 1, 8, 64, 256 against PyTorch eager + transformers on the
#      same safetensors and the same card (scripts/bench/torch_decode.py);
#   3. a council: `council dev bench-batching --scenarios deliberation` (3 agents, 1 review
#      round), batched against one call at a time;
#   4. the card and the software (nvidia-smi, torch) for the record.
set -uo pipefail
out="${1:?usage: check.sh OUT_DIR}"
council="${COUNCIL:-${CARGO_TARGET_DIR:-target}/release/council}"
cuda="${CUDA-0}"
shape="${SHAPE:-small}"
batches="${BATCHES:-1,8,64,256}"
[ -x "$council" ] || { echo "no council binary at $council (set COUNCIL)" >&2; exit 1; }
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
device=() torch_device=(--device cpu --dtype f32)
if [ -n "$cuda" ]; then
  device=(--cuda "$cuda")
  torch_device=(--device "cuda:$cuda" --dtype bf16)
fi
max_batch="${batches##*,}"

step() {  # step NAME SECONDS COMMAND...
  local name="$1" limit="$2"
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$out/$name.txt" 2>&1
  local rc=$?
  echo "$name: exit $rc in $((SECONDS - start)) s" | tee -a "$out/status.txt"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  python3 -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)' 2>&1 || true
  "$council" --version; } >"$out/machine.txt"

if [ -n "$cuda" ]; then
  step gpu-check 300 "$council" dev gpu-check "${device[@]}"
else
  step gpu-check 300 "$council" dev gpu-check --quantize q8_0
fi
step tiny-model 120 "$council" dev tiny-model "$work/q05" --shape "$shape"
step bench 600 "$council" dev bench --model-dir "$work/q05" "${device[@]}" \
  --prompt-tokens 512 --new-tokens 32 --batch "$batches" --max-batch "$max_batch" \
  --max-step-tokens 8192
step torch 600 python3 "$(dirname "$0")/../bench/torch_decode.py" --model-dir "$work/q05" \
  "${torch_device[@]}" --prompt-tokens 512 --new-tokens 32 --batch "$batches"
step batching 600 "$council" dev bench-batching --model-dir "$work/q05" "${device[@]}" \
  --scenarios deliberation --max-tokens-per-call 128
cat "$out/status.txt"
