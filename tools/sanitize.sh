#!/usr/bin/env bash
# compute-sanitizer over a small subset of the CUDA prefill tests: memcheck on the small
# cases of tests/test_prefill_cuda.py (every kernel path: causal, windows, softcap, GQA,
# head_dim 40..256, varlen with empty sequences, fwd + bwd), then racecheck on one small
# case. Only attnkit's kernels are instrumented (--kernel-name kns=attnkit); torch's own
# run at full speed. PYTORCH_NO_CUDA_MEMORY_CACHING=1 makes every tensor its own
# allocation, so an out-of-bounds access is not hidden inside a larger cached block.
#
#   bash tools/sanitize.sh [LOG]        (needs a GPU, a built extension and compute-sanitizer)
#   env: PYTHON (python3), SANITIZE_TIMEOUT_S (per tool run, default 240)
# Exit status: 0 clean (or nothing to check: no GPU / no sanitizer, said in the log),
# 1 errors found or a run failed.
set -uo pipefail
cd "$(dirname "$0")/.."
log="${1:-/dev/stdout}"
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || PY=python
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
limit=${SANITIZE_TIMEOUT_S:-240}

say() { echo "$*" >> "$log"; }

san=$(command -v compute-sanitizer || true)
if [[ -z $san ]]; then
  for d in "${CUDA_HOME:-}" "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc 2>/dev/null || echo /nonexistent)")")")" \
           /usr/local/cuda; do
    [[ -n $d && -x $d/bin/compute-sanitizer ]] && { san=$d/bin/compute-sanitizer; break; }
  done
fi
if [[ -z $san ]]; then
  say "sanitize: compute-sanitizer not found (PATH, \$CUDA_HOME/bin, nvcc's toolkit, /usr/local/cuda): skipped"
  exit 0
fi
if ! "$PY" -c "import attnkit, sys; sys.exit(0 if attnkit.cuda_available() and attnkit.has_cuda_kernel('attention') else 1)" 2>/dev/null; then
  say "sanitize: no GPU or no CUDA prefill kernel in this build: skipped"
  exit 0
fi

export PYTORCH_NO_CUDA_MEMORY_CACHING=1
common=(--kernel-name kns=attnkit --error-exitcode 86 --print-limit 20)
status=0
run() {  # run TOOL PYTEST_ARGS...
  local tool=$1 s rc
  shift
  say "== compute-sanitizer --tool $tool: pytest $*"
  s=$(date +%s)
  timeout -k 10 "$limit" "$san" --tool "$tool" "${common[@]}" "$PY" -m pytest -q -p no:cacheprovider "$@" >> "$log" 2>&1
  rc=$?
  case $rc in
    0) say "== $tool: clean in $(( $(date +%s) - s ))s" ;;
    86) say "== $tool: ERRORS FOUND (see above)"; status=1 ;;
    124|137) say "== $tool: TIMED OUT after ${limit}s"; status=1 ;;
    *) say "== $tool: exit $rc (tests failed or the tool could not run; see above)"; status=1 ;;
  esac
}

run memcheck tests/test_prefill_cuda.py -k "small_sanitize"
run racecheck tests/test_prefill_cuda.py -k "small_sanitize and d64"
exit $status
