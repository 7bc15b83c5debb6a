#!/usr/bin/env bash
# Runs pytest-allreduce on the GPU machine (through the device tool) and leaves the log,
# the artifacts (as one archive) and the environment (env.txt, once) under $OUT.
#   usage: tools/device-suites.sh NAME [pytest arguments...]
# The GPU kit is set up by tools/device-env.sh (carried as .devkit/ in a machine's first call).
set -u -o pipefail
name=$1; shift
source tools/device-env.sh || exit 3
[ -f "$OUT/env.txt" ] || {
    date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    nvidia-smi topo -m
    python3 -c "import torch, sys; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version())"
    python3 -c "import flashinfer; print('flashinfer', flashinfer.__version__)" 2>&1 | tail -1
    python3 -c "import sgl_kernel, importlib.metadata as m; print('sgl-kernel', m.version('sglang-kernel'))" 2>&1 | tail -1
    env | grep -E 'NCCL_NVLS|MULTICAST|NVSHMEM_DISABLE' | sort
} >"$OUT/env.txt" 2>&1
start=$(date +%s)
echo "command: python3 -m pytest $*" >"$OUT/$name.log"
python3 -m pytest "$@" --allreduce-output-dir="$OUT/$name" -rs --durations=15 2>&1 |
    tee -a "$OUT/$name.log"
status=${PIPESTATUS[0]}
echo "pytest exit status $status; wall time $(( $(date +%s) - start )) s" | tee -a "$OUT/$name.log"
tar czf "$OUT/$name-artifacts.tgz" -C "$OUT" "$name" && rm -rf "${OUT:?}/$name"
exit 0
