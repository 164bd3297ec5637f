#!/usr/bin/env bash
# The four arms (single, self-refine, majority, council) on SmolLM2-135M-Instruct, two
# generated suites, the settings of docs/EVAL.md ("The four arms on SmolLM2-135M"):
#
#   scripts/eval/four-arms.sh OUT_DIR [LIMIT (default 40)] [extra eval flags...]
#
# COUNCIL (default: target/release/council under CARGO_TARGET_DIR or ./target) runs them, one
# suite after the other (two engines at once would share two cores and time nothing). A run
# that is stopped resumes where it was: run the same command again. Each suite's report is
# OUT_DIR/<suite>-<limit>/report.md; the wall time of each is printed.
set -euo pipefail
out="${1:?usage: four-arms.sh OUT_DIR [LIMIT] [flags...]}"
limit="${2:-40}"
shift $(( $# >= 2 ? 2 : 1 ))
council="${COUNCIL:-${CARGO_TARGET_DIR:-target}/release/council}"
[ -x "$council" ] || { echo "no council binary at $council (set COUNCIL)" >&2; exit 1; }
for suite in arithmetic last_letters; do
  dir="$out/$suite-$limit"
  start=$(date +%s)
  "$council" eval --quantize q8_0 --suite "$suite" --limit "$limit" --seed 7 --rounds 1 \
    --max-tokens-per-call 128 --max-vote-samples 16 --max-batch 32 --concurrency 10 \
    --out "$dir" "$@"
  echo "$suite: $(( $(date +%s) - start )) s wall; report: $dir/report.md" >&2
done
