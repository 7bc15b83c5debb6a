# Sourced at the start of every command on the GPU machine, from the repository root:
#     source tools/device-env.sh
# The first call of a machine carries the GPU kit (.devkit/, a copy of ../shared/devkit) and
# unpacks it into /tmp/site; later calls on the same warm machine may carry other things
# instead (a model chunk), so they reuse /tmp/site without the kit. NVLink multicast stays
# off in every process either way.
if [ -f .devkit/setup-on-device.sh ]; then
    # shellcheck source=/dev/null
    source .devkit/setup-on-device.sh
elif [ -f /tmp/site/.devkit-ok ]; then
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "device-env: no .devkit/ carried and none unpacked in /tmp/site: carry .devkit" >&2
    return 3 2>/dev/null || exit 3
fi
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
if ! python3 -c "import importlib.metadata as m; m.version('pytest-allreduce')" 2>/dev/null; then
    python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/tmp/allreduce-install.log 2>&1 ||
        { cat /tmp/allreduce-install.log >&2; return 3 2>/dev/null || exit 3; }
fi
