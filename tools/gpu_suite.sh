#!/usr/bin/env bash
# One call on an offline GPU test machine (torch present, no network; see
# ../shared/device/README.md): install the carried wheels (.whl/, from
# ../shared/device/fetch_wheels.sh), build in place with 16 jobs, run the CUDA tests, then
# compute-sanitizer on a few small ones (tools/sanitize.sh), the whole test suite, the C++
# microbenchmark bench/prefill (built by CMake in the background while the tests run, a
# short case list), then the Python benchmark on CUDA, and write logs + report to the output
# folder (argument, else $OUT, else ./bench_out). A short summary is printed last.
#
# With a carried prebuilt build (`make gpu-carry` here, then carry ["build/carry", ".whl"]):
# when build/carry/manifest.json matches this machine and tree (tools/carry.py), it is
# installed (seconds) instead of building (minutes); suite.log says which PATH was taken.
#
#   bash tools/gpu_suite.sh [OUT_DIR]
#   env: ATTNKIT_CUDA_ARCHS (default 90a), MAX_JOBS (16), PYTHON (python3),
#        SUITE_CARRY=0 (ignore a carried build: build here), SUITE_CARRY_DIR (build/carry),
#        CARRY_STRICT_COMMIT=1 (use a carried build only when its commit is the tree's too),
#        SUITE_STOP_AFTER=build (stop after the build step: a dry run of set-up and install),
#        ATTNKIT_COMMIT (the commit to report where the tree travels without .git),
#        SUITE_BUDGET_S (default 540: every step is fitted inside it, under the 10-minute limit),
#        BENCH_ARGS (extra arguments of python -m attnkit.bench, e.g. "--quick" or "--family decode"),
#        SUITE_SANITIZE=0 (skip compute-sanitizer), SUITE_CPP_BENCH=0 (skip bench/prefill),
#        CPP_BENCH_ARGS (arguments of bench/prefill; default a short list, fwd + bwd),
#        CPP_DECODE_ARGS (runs of bench/decode separated by ';', each its arguments; default
#        the dense / paged / sparse list, then int8, fp8, int4 (plain and with rotated keys, the
#        PagedKVCache default) and int4 group-32 caches at
#        32k and 128k context against bf16 in the same run), CPP_NA_ARGS (of bench/neighborhood), CPP_BS_ARGS (of bench/block_sparse).
#
# Files written (at most 8, what the device tool brings back): suite.log (wheels, GPU,
# versions, step times, which build PATH was taken), build.log (the carried build's install,
# or setup.py; then the CMake build of bench/prefill),
# test_cuda.log (pytest -m cuda, then compute-sanitizer), test_all.log, bench.log (the
# Python benchmark, then bench/prefill's table), and the report
# <gpu>-<yyyymmdd>-<commit>.{json,md,png} named as bench/results/ wants them.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out="${1:-${OUT:-bench_out}}"
mkdir -p "$out"
out=$(cd "$out" && pwd)
log="$out/suite.log"
: > "$log"
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || PY=python
budget=${SUITE_BUDGET_S:-540}
t0=$(date +%s)

say() { echo "$*" | tee -a "$log"; }
left() { echo $(( budget - ($(date +%s) - t0) )); }
# step_timeout CAP RESERVE: the cap, or what is left of the budget after RESERVE seconds.
step_timeout() { local l; l=$(( $(left) - $2 )); (( l > $1 )) && l=$1; (( l < 1 )) && l=1; echo "$l"; }
pytest_line() {  # the summary line of a pytest log, or why there is none
  local f=$1 rc=$2 line
  line=$(grep -E '[0-9]+ (passed|failed|error|errors|skipped|deselected)|no tests ran' "$f" 2>/dev/null | tail -n 1 | sed 's/^=* *//; s/ *=*$//')
  if [[ $rc == 124 || $rc == 137 ]]; then line="TIMED OUT (${line:-no summary})"; fi
  echo "${line:-no summary (exit $rc), see $(basename "$f")}"
}

# -- set-up: wheels, environment, GPU -----------------------------------------------
if ls .whl/*.whl >/dev/null 2>&1; then
  if "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >> "$log" 2>&1; then
    say "wheels installed into /tmp/site: $(cd .whl && ls *.whl | tr '\n' ' ')"
  else
    say "WARNING: pip install of .whl/*.whl failed (see above)"
  fi
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
  say "WARNING: no .whl/*.whl here (run ../shared/device/fetch_wheels.sh and carry .whl): CUTLASS only via CUTLASS_DIR"
fi
export PYTHONPATH="$root/python${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS="${MAX_JOBS:-16}" ATTNKIT_CUDA_ARCHS="${ATTNKIT_CUDA_ARCHS:-90a}"
sha=${ATTNKIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export ATTNKIT_COMMIT=$sha
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
gpu=${gpu:-unknown GPU}
{
  echo "== nvidia-smi"
  nvidia-smi
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu --format=csv
  echo "== versions"
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| cudnn', torch.backends.cudnn.version(), '| gpu ok', torch.cuda.is_available())"
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
  echo "commit $sha, ATTNKIT_CUDA_ARCHS=$ATTNKIT_CUDA_ARCHS, MAX_JOBS=$MAX_JOBS, budget ${budget}s"
} >> "$log" 2>&1

# -- build: the carried prebuilt one (make gpu-carry) when it matches, else here -------
# tools/carry.py checks build/carry/manifest.json against this python (extension suffix),
# torch (release, CUDA major), ATTNKIT_CUDA_ARCHS and this tree (hash of the build inputs;
# the commit is compared and reported), unpacks the extension into python/attnkit/ and the
# C++ benches into build/cmake/; then attnkit must import, else it is removed and built here.
s=$(date +%s)
carry_dir=${SUITE_CARRY_DIR:-build/carry}
build_how=built
: > "$out/build.log"
if [[ ${SUITE_CARRY:-1} != 0 && -f $carry_dir/manifest.json ]]; then
  echo "======== carried build ($carry_dir, tools/carry.py install) ========" >> "$out/build.log"
  if timeout -k 5 120 "$PY" tools/carry.py install --carry "$carry_dir" >> "$out/build.log" 2>&1; then
    if timeout -k 5 120 "$PY" -c "import attnkit; print('attnkit imports:', attnkit.cuda_capabilities())" >> "$out/build.log" 2>&1; then
      build_how=carried
    else
      "$PY" tools/carry.py uninstall --carry "$carry_dir" >> "$out/build.log" 2>&1
      say "carried build: installed, but attnkit does not import with it (see build.log): removed"
    fi
  fi
  grep -E '^(carried build|no carried build)' "$out/build.log" | while IFS= read -r line; do say "$line"; done
else
  say "carried build: none ($carry_dir/manifest.json missing, or SUITE_CARRY=0)"
fi
if [[ $build_how == carried ]]; then
  rc=0
  build_s=$(( $(date +%s) - s ))
  say "build: PATH carried: installed the prebuilt build from $carry_dir in ${build_s}s, no compile here"
else
  say "build: PATH on-device: compiling here (setup.py, MAX_JOBS=$MAX_JOBS)"
  s=$(date +%s)
  tb=$(step_timeout 330 150)
  echo "======== setup.py build_ext ========" >> "$out/build.log"
  timeout -k 10 "$tb" "$PY" setup.py build_ext --inplace --build-temp build/gpu >> "$out/build.log" 2>&1
  rc=$?
  build_s=$(( $(date +%s) - s ))
  say "build: exit $rc in ${build_s}s (limit ${tb}s)"
fi
if (( rc != 0 )); then
  echo "---- tail of build.log"
  tail -n 40 "$out/build.log"
  echo "== attnkit GPU suite: $gpu, commit $sha: BUILD FAILED (exit $rc$( ((rc == 124)) && echo ", timed out after ${tb}s")) after ${build_s}s; see build.log"
  exit 1
fi

if [[ ${SUITE_STOP_AFTER:-} == build ]]; then  # a dry run of the set-up and build steps
  say "SUITE_STOP_AFTER=build: stopping after the build step (PATH $build_how, ${build_s}s)"
  exit 0
fi

# -- C++ microbenchmark build, in the background while the tests run ---------------
cpp_build_log=$(mktemp) cpp_log=$(mktemp)
cpp_pid=""
cpp_carried=0
if [[ ${SUITE_CPP_BENCH:-1} != 0 && $build_how == carried ]] && grep -q '/build/cmake/prefill$' "$carry_dir/installed.txt" 2>/dev/null; then
  # Carried with the extension: nothing to build. They were linked here, so a shared
  # library (cuBLAS) may sit elsewhere on this machine: torch's CUDA wheels' lib folders.
  cpp_carried=1
  if ldd build/cmake/prefill build/cmake/decode build/cmake/neighborhood build/cmake/block_sparse 2>/dev/null | grep -q 'not found'; then
    nvlib=$("$PY" -c "import nvidia, os, glob; print(':'.join(d for p in nvidia.__path__ for d in glob.glob(os.path.join(p, '*', 'lib'))))" 2>/dev/null)
    export LD_LIBRARY_PATH="${nvlib}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    say "bench/prefill: carried binaries miss a library; LD_LIBRARY_PATH += torch's nvidia lib folders"
    ldd build/cmake/prefill 2>/dev/null | grep 'not found' | tee -a "$log"
  fi
  echo "== C++ benches carried ($carry_dir), not built here" > "$cpp_build_log"
  say "bench/prefill: carried build, no CMake build"
elif [[ ${SUITE_CPP_BENCH:-1} != 0 ]] && command -v cmake >/dev/null 2>&1; then
  tc=$(step_timeout 420 120)
  pybin=$(command -v "$PY")
  # Its own session (setsid), so that the whole build can be stopped by its process group.
  setsid bash -c "s=\$(date +%s)
    timeout -k 10 $tc cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE='$pybin' \
        -DCMAKE_CUDA_ARCHITECTURES='$ATTNKIT_CUDA_ARCHS' \
      && timeout -k 10 $tc nice -n 10 cmake --build build/cmake --target prefill decode neighborhood block_sparse -j $MAX_JOBS
    echo \"== cmake build of bench/prefill: exit \$? in \$(( \$(date +%s) - s ))s (limit ${tc}s)\"" \
    > "$cpp_build_log" 2>&1 &
  cpp_pid=$!
  say "bench/prefill: CMake build started in the background (limit ${tc}s)"
else
  say "bench/prefill: skipped (SUITE_CPP_BENCH=0 or no cmake)"
fi

# -- tests --------------------------------------------------------------------------
s=$(date +%s)
tt=$(step_timeout 120 180)
timeout -k 10 "$tt" "$PY" -m pytest -q -m cuda tests > "$out/test_cuda.log" 2>&1
rc_cuda=$?
say "pytest -m cuda: exit $rc_cuda in $(( $(date +%s) - s ))s (limit ${tt}s)"
rc_san=skipped
if [[ ${SUITE_SANITIZE:-1} != 0 ]]; then
  s=$(date +%s)
  tsan=$(step_timeout 200 200)
  if (( tsan >= 60 )); then
    echo -e "\n======== tools/sanitize.sh (compute-sanitizer) ========" >> "$out/test_cuda.log"
    SANITIZE_TIMEOUT_S=$(( tsan / 2 )) PYTHON="$PY" bash tools/sanitize.sh "$out/test_cuda.log"
    rc_san=$?
  fi
  say "sanitize: exit $rc_san in $(( $(date +%s) - s ))s (limit ${tsan}s)"
fi
s=$(date +%s)
tt=$(step_timeout 180 130)
timeout -k 10 "$tt" "$PY" -m pytest -q tests > "$out/test_all.log" 2>&1
rc_all=$?
say "pytest (all): exit $rc_all in $(( $(date +%s) - s ))s (limit ${tt}s)"

# -- C++ microbenchmark: wait for its build, run a short case list --------------------
rc_cpp=skipped
if [[ -n $cpp_pid || $cpp_carried == 1 ]]; then
  if [[ -n $cpp_pid ]]; then
    tw=$(step_timeout 120 200)
    for (( i = 0; i < tw; i++ )); do kill -0 "$cpp_pid" 2>/dev/null || break; sleep 1; done
    if kill -0 "$cpp_pid" 2>/dev/null; then
      kill -- "-$cpp_pid" 2>/dev/null
      echo "== cmake build of bench/prefill: stopped, still running after the wait of ${tw}s" >> "$cpp_build_log"
    fi
    wait "$cpp_pid" 2>/dev/null
  fi
  { echo; echo "======== CMake build of bench/prefill ========"; cat "$cpp_build_log"; } >> "$out/build.log"
  if [[ -x build/cmake/prefill ]]; then
    s=$(date +%s)
    tcpp=$(step_timeout 90 160)
    # shellcheck disable=SC2086
    timeout -k 5 "$tcpp" build/cmake/prefill ${CPP_BENCH_ARGS:---seqlen 1024,4096,16384 --bwd --iters 10} > "$cpp_log" 2>&1
    rc_cpp=$?
    say "bench/prefill: exit $rc_cpp in $(( $(date +%s) - s ))s (limit ${tcpp}s)"
    if [[ -x build/cmake/decode ]]; then
      s=$(date +%s)
      quant_cases="--cases 1:32768,1:131072,8:32768 --keep 0 --iters 10"
      IFS=';' read -ra decode_runs <<< "${CPP_DECODE_ARGS:---iters 10;--kv-format int8 $quant_cases;--kv-format fp8_e4m3 $quant_cases;--kv-format int4 $quant_cases;--kv-format int4 --rotate-keys $quant_cases;--kv-format int4 --group-size 32 $quant_cases}"
      for decode_args in "${decode_runs[@]}"; do
        s=$(date +%s)
        tdec=$(step_timeout 60 150)
        { echo; echo "======== bench/decode $decode_args (C++, torch-free) ========"; } >> "$cpp_log"
        # shellcheck disable=SC2086
        timeout -k 5 "$tdec" build/cmake/decode $decode_args >> "$cpp_log" 2>&1
        say "bench/decode $decode_args: exit $? in $(( $(date +%s) - s ))s (limit ${tdec}s)"
      done
    fi
    if [[ -x build/cmake/neighborhood ]]; then
      s=$(date +%s)
      tna=$(step_timeout 45 140)
      { echo; echo "======== bench/neighborhood (C++, torch-free) ========"; } >> "$cpp_log"
      # shellcheck disable=SC2086
      timeout -k 5 "$tna" build/cmake/neighborhood ${CPP_NA_ARGS:---hdim 128 --bwd --iters 5} >> "$cpp_log" 2>&1
      say "bench/neighborhood: exit $? in $(( $(date +%s) - s ))s (limit ${tna}s)"
    fi
    if [[ -x build/cmake/block_sparse ]]; then
      s=$(date +%s)
      tbs=$(step_timeout 45 140)
      { echo; echo "======== bench/block_sparse (C++, torch-free) ========"; } >> "$cpp_log"
      # shellcheck disable=SC2086
      timeout -k 5 "$tbs" build/cmake/block_sparse ${CPP_BS_ARGS:---seqlen 8192,32768 --bwd --iters 10} >> "$cpp_log" 2>&1
      say "bench/block_sparse: exit $? in $(( $(date +%s) - s ))s (limit ${tbs}s)"
    fi
  else
    echo "bench/prefill was not built; see build.log" > "$cpp_log"
    rc_cpp=nobuild
    say "bench/prefill: not built (see build.log)"
  fi
fi

# -- benchmark ----------------------------------------------------------------------
tag="$(echo "$gpu" | sed 's/^NVIDIA //' | tr -c 'A-Za-z0-9._-' '-' | sed 's/-*$//')-$(date +%Y%m%d)-$sha"
s=$(date +%s)
tbench=$(step_timeout 300 15)
bench_args=${BENCH_ARGS:-}
(( tbench < 150 )) && [[ $bench_args != *--quick* ]] && bench_args="--quick $bench_args" && say "bench: little time left, running --quick"
if (( tbench >= 40 )); then
  # --budget-s: no new case starts after it, so the run ends (and writes its reports) before the timeout.
  # shellcheck disable=SC2086
  # --roofline: each row also shows its fraction of the analytical time floor (times nothing more).
  timeout -k 10 "$tbench" "$PY" -m attnkit.bench --device cuda --roofline --budget-s $(( tbench * 3 / 4 )) \
    --json "$out/$tag.json" --md "$out/$tag.md" --plot "$out/$tag.png" $bench_args > "$out/bench.log" 2>&1
  rc_bench=$?
else
  rc_bench=skipped
  echo "bench skipped: ${tbench}s left of the budget" > "$out/bench.log"
fi
say "bench: exit $rc_bench in $(( $(date +%s) - s ))s (limit ${tbench}s)"
if [[ $rc_cpp != skipped ]]; then
  { echo; echo "======== bench/prefill (C++, torch-free) ========"; cat "$cpp_log"; } >> "$out/bench.log"
fi

# -- summary (last, so the device tool's output tail holds it) ------------------------
echo
echo "== attnkit GPU suite: $gpu, commit $sha, archs $ATTNKIT_CUDA_ARCHS, total $(( $(date +%s) - t0 ))s"
echo "build:       ok in ${build_s}s ($([[ $build_how == carried ]] && echo "carried prebuilt build installed, nothing compiled" || echo "compiled here"))"
echo "cuda tests:  $(pytest_line "$out/test_cuda.log" $rc_cuda)"
echo "sanitize:    exit $rc_san; $(grep -E '^== (memcheck|racecheck):|^sanitize:' "$out/test_cuda.log" | tr '\n' ' ')"
echo "all tests:   $(pytest_line "$out/test_all.log" $rc_all)"
echo "bench:       exit $rc_bench; $(grep -E '^[0-9]+ rows' "$out/bench.log" | tail -n 1)"
echo "bench/prefill (C++): exit $rc_cpp"
[[ -s $cpp_log ]] && tail -n 25 "$cpp_log"
fails=$(grep -hE '^(FAILED|ERROR) ' "$out/test_cuda.log" "$out/test_all.log" 2>/dev/null | sort -u | head -n 15)
[[ -n $fails ]] && { echo "failures (first 15):"; echo "$fails"; }
if [[ -s "$out/$tag.md" ]]; then
  echo
  # The report's header and tables, without the per-row reproduction commands.
  awk '/^## Reproduce/{skip=1} /^## Skipped/{skip=0} !skip' "$out/$tag.md" | head -n 150
else
  echo "no benchmark report; tail of bench.log:"
  tail -n 30 "$out/bench.log"
fi
echo
echo "files in $out: $(cd "$out" && ls | tr '\n' ' ')"
status=0
[[ $rc_cuda == 0 || $rc_cuda == 5 ]] || status=1   # 5: no CUDA tests collected
[[ $rc_san == 0 || $rc_san == skipped ]] || status=1
[[ $rc_cpp == 0 || $rc_cpp == skipped ]] || status=1
[[ $rc_all == 0 ]] || status=1
[[ $rc_bench == 0 ]] || status=1
exit $status
