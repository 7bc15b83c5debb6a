# Sourced at the start of every command on the GPU machine, from the repository root:
#     source tools/device-env.sh
# The first call of a machine carries the GPU kit (.devkit/, a copy of ../shared/devkit); its
# set-up script unpacks the GPU-only packages into a site folder of its choosing and puts that
# folder first on PYTHONPATH. That folder is recorded here, so that later calls on the same
# warm machine may carry other things instead (a model chunk) and still find the kit.
# NVLink multicast stays off in every process either way. Exports DEVKIT_SITE.
record="$HOME/.cache/pytest-allreduce/devkit-site"
if [ -f .devkit/setup-on-device.sh ]; then
    # shellcheck source=/dev/null
    source .devkit/setup-on-device.sh
    DEVKIT_SITE=${PYTHONPATH%%:*}
    mkdir -p "$(dirname "$record")" && printf '%s\n' "$DEVKIT_SITE" >"$record"
elif [ -f "$record" ] && [ -f "$(cat "$record")/.devkit-ok" ]; then
    DEVKIT_SITE=$(cat "$record")
    export PYTHONPATH="$DEVKIT_SITE${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "device-env: no .devkit/ carried and no kit unpacked on this machine: carry .devkit" >&2
    return 3 2>/dev/null || exit 3
fi
export DEVKIT_SITE
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
if ! python3 -c "import importlib.metadata as m; m.version('pytest-allreduce')" 2>/dev/null; then
    python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/tmp/allreduce-install.log 2>&1 ||
        { cat /tmp/allreduce-install.log >&2; return 3 2>/dev/null || exit 3; }
fi
