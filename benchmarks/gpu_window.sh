#!/usr/bin/env bash
# Issue 13's GPU measurements in one pass on 2 x H200, each step bounded, every output under
# $OUT. Run from the repository root, with the nccl-tests tools folder carried in the repo:
#
#   bash benchmarks/gpu_window.sh probe      # pynccl_probe.py                     ~2.5 min
#   bash benchmarks/gpu_window.sh versus     # vs_nccl_tests.py (builds nccl-tests) ~4 min
#   bash benchmarks/gpu_window.sh main       # the default main job, timed          ~2-3 min
#   bash benchmarks/gpu_window.sh invariance # timing_invariance.py                  ~1.5 min
#
# Several steps may be given in one call. A step that fails or times out is reported and
# the next one still runs; the exit status says whether all passed.
set -u
here=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-$here/gpu-window-out}
tools=${NCCL_TESTS_TOOLS:-$here/.tools/nccl-tests}
mkdir -p "$out"
status=0

step() {
  local name=$1 limit=$2
  shift 2
  local began=$SECONDS
  echo "=== $name (limit ${limit}s): $*"
  timeout --kill-after=20 "$limit" "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - began)) s" | tee -a "$out/steps.txt"
  [ "$rc" -eq 0 ] || status=1
}

for what in "$@"; do
  case $what in
    probe)
      step probe 240 python "$here/benchmarks/pynccl_probe.py" --out "$out/probe" ;;
    versus)
      step versus 480 python "$here/benchmarks/vs_nccl_tests.py" --tools "$tools" --out "$out/versus" ;;
    main)
      # From an empty folder, as a user runs it: default options, artifacts under $out/main.
      mkdir -p "$out/main-cwd"
      step main 540 bash -c "cd '$out/main-cwd' && PYTHONPATH='$here/benchmarks' python -m pytest \
        --pyargs pytest_allreduce.suites -p no:cacheprovider -p phase_timer --durations=40 -rfE \
        --allreduce-output-dir='$out/main'" ;;
    invariance)
      step invariance 300 python "$here/benchmarks/timing_invariance.py" --out "$out/invariance" ;;
    *)
      echo "unknown step $what (probe, versus, main, invariance)"; status=2 ;;
  esac
done
exit $status
