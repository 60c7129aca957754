#!/usr/bin/env bash
# On a GPU machine with a built addon: runs the GPU test suite (REQUIRE_GPU=1) and every
# benchmark suite, one JSON + Markdown file per suite, named <suite>-<gpu>.json.
#   scripts/gpu-suite.sh [OUTDIR] [SUITES]     (default bench/out, all suites)
set -uo pipefail
cd "$(dirname "$0")/.."
dir=${1:-bench/out}
suites=${2:-gemv lut attention kvquant decode api}
mkdir -p "$dir"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | grep -oE 'H100|H200|A100|L40S|L4|RTX [0-9]+' | tr 'A-Z ' 'a-z-')
gpu=${gpu:-gpu}

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  start=$(date +%s)
  npm run -s test:gpu -- --json --outputFile="$dir/jest.json" >"$dir/test.log" 2>&1
  echo "test:gpu exit $? in $(( $(date +%s) - start )) s"
  node -e "const r=require('./$dir/jest.json'); console.log(r.numPassedTests+' passed, '+r.numFailedTests+' failed, '+r.numPendingTests+' skipped'); for (const s of r.testResults) for (const t of s.assertionResults) if (t.status==='failed') console.log('FAILED', t.fullName, '\n   ', (t.failureMessages[0]||'').split('\n').slice(0,4).join('\n    '))" 2>&1 | head -60
fi

for s in $suites; do
  start=$(date +%s)
  timeout "${BENCH_TIMEOUT:-300}" node dist/bench/run.js --only "$s" --out "$dir/$s-$gpu.json" >>"$dir/bench.log" 2>&1
  echo "bench $s exit $? in $(( $(date +%s) - start )) s"
  [ -f "$dir/$s-$gpu.md" ] && cat "$dir/$s-$gpu.md"
done
