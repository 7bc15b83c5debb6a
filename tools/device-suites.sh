#!/usr/bin/env bash
# Runs pytest-allreduce on the GPU machine (through the device tool) and leaves the log,
# the artifacts (as one archive) and the environment (env.txt, once) under $OUT.
#   usage: tools/device-suites.sh NAME [pytest arguments...]
# The GPU kit must be at .devkit/ (a copy of ../shared/devkit, carried with the call).
set -u -o pipefail
name=$1; shift
source .devkit/setup-on-device.sh
# NVLink multicast stays off in every process started here (setup-on-device.sh sets these
# too; repeated so this script is safe on its own).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
if ! python3 -c "import importlib.metadata as m; m.version('pytest-allreduce')" 2>/dev/null; then
    python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 ||
        { cat "$OUT/install.log"; exit 3; }
fi
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
