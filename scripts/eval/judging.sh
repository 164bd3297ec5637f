#!/usr/bin/env bash
# Judging on a real model: 20 seeded deliberations (DEV and QA councils, seeds 1-10, 3 agents,
# 1 review round) with one judge, then the tally of docs/EVAL.md ("Judging on SmolLM2"):
# judgements asked and read, empty replies, failed calls, winners decided by a tie-break.
#
#   scripts/eval/judging.sh OUT_DIR [logprob|text] [extra deliberate flags...]
#
# COUNCIL (default: target/release/council under CARGO_TARGET_DIR or ./target) runs them; the
# model is the README's (SmolLM2-135M-Instruct, q8_0) unless the extra flags name another.
set -euo pipefail
out="${1:?usage: judging.sh OUT_DIR [logprob|text] [flags...]}"
judge="${2:-logprob}"
shift $(( $# >= 2 ? 2 : 1 ))
council="${COUNCIL:-${CARGO_TARGET_DIR:-target}/release/council}"
[ -x "$council" ] || { echo "no council binary at $council (set COUNCIL)" >&2; exit 1; }
mkdir -p "$out"
task="Propose a retry policy for a flaky job queue."
for role in DEV QA; do
  for seed in $(seq 1 10); do
    file="$out/$judge-$role-$seed.json"
    [ -s "$file" ] && continue
    start=$(date +%s.%N)
    "$council" deliberate --role "$role" --rounds 1 --agents 3 --quantize q8_0 --seed "$seed" \
      --judge "$judge" --json "$@" "$task" > "$file.part"
    mv "$file.part" "$file"
    echo "$role seed $seed: $(python3 -c "print(f'{$(date +%s.%N) - $start:.1f}')") s" >&2
  done
done
python3 - "$out" "$judge" <<'PY'
import glob, json, sys
out, judge = sys.argv[1], sys.argv[2]
rows = {}
for path in sorted(glob.glob(f"{out}/{judge}-*.json")):
    role = path.rsplit("/", 1)[1].split("-")[1]
    o = json.load(open(path))
    r = rows.setdefault(role, dict(n=0, calls=0, failed=0, empty=0, ra=0, rr=0, sa=0, sr=0, tie=0, some_rank=0))
    r["n"] += 1
    r["calls"] += o["usage"]["calls"]
    r["failed"] += o["usage"]["failed_calls"]
    # Log-prob judgements are choices (no text); every other call writes text.
    written = lambda t: t["phase"] != "score" or judge == "text"
    r["empty"] += sum(1 for t in o["transcript"] if written(t) and "text" in t["reply"]
                      and not t["reply"]["text"].strip())
    j = o["judging"]
    r["ra"] += j["rankings_asked"]; r["rr"] += j["rankings_read"]
    r["sa"] += j["scores_asked"]; r["sr"] += j["scores_read"]
    r["some_rank"] += j["rankings_read"] > 0
    r["tie"] += o["decided_by"] == "tie_break"
tot = {k: sum(r[k] for r in rows.values()) for k in next(iter(rows.values()))}
rows["all"] = tot
pct = lambda a, b: f"{100 * a / b:.0f} %" if b else "-"
print(f"judge: {judge}")
print("| | " + " | ".join(rows) + " |")
print("|---" * (len(rows) + 1) + "|")
def line(name, f):
    print(f"| {name} | " + " | ".join(f(r) for r in rows.values()) + " |")
line("deliberations", lambda r: str(r["n"]))
line("calls / failed / empty replies", lambda r: f'{r["calls"]} / {r["failed"]} / {r["empty"]}')
line("peer rankings read / asked", lambda r: f'{r["rr"]} / {r["ra"]} ({pct(r["rr"], r["ra"])})')
line("rubric scores read / asked", lambda r: f'{r["sr"]} / {r["sa"]} ({pct(r["sr"], r["sa"])})')
line("all judgements read", lambda r: f'{r["rr"] + r["sr"]} / {r["ra"] + r["sa"]} ({pct(r["rr"] + r["sr"], r["ra"] + r["sa"])})')
line("deliberations with some ranking read", lambda r: f'{r["some_rank"]} / {r["n"]}')
line("winners decided by the tie-break", lambda r: f'{r["tie"]} / {r["n"]} ({pct(r["tie"], r["n"])})')
PY
