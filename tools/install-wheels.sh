#!/usr/bin/env bash
# Installs the wheels carried in .whl/ (lm-eval and the parts of its stack the GPU image lacks,
# plus gguf) into the GPU kit's site folder (DEVKIT_SITE, set by tools/device-env.sh), which
# is already on PYTHONPATH.
# The GPU machine has no package index, so nothing is resolved there: the folder must already
# hold every wheel, and the image supplies the rest (pyarrow, pandas, fsspec, huggingface-hub...).
# A warm machine keeps that folder, so later calls skip the install.
#     bash tools/install-wheels.sh [WHEEL_FOLDER]      (default .whl)
set -euo pipefail

wheels=${1:-.whl}
site=${SITE_DIR:-${DEVKIT_SITE:?source tools/device-env.sh first, or set SITE_DIR}}
python=${PYTHON:-python3}
marker=$site/.wheels-ok

if [ ! -f "$marker" ]; then
    shopt -s nullglob
    found=("$wheels"/*.whl)
    shopt -u nullglob
    [ ${#found[@]} -gt 0 ] || { echo "install-wheels: no wheels in $wheels" >&2; exit 1; }
    mkdir -p "$site"
    "$python" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check \
        --target "$site" "${found[@]}"
    # Names and versions, so the marker also says what this machine got.
    (cd "$wheels" && ls -1 -- *.whl) >"$marker"
fi

# Import check with the image's own packages beside them; prints the versions that decide
# whether datasets works there (it was tested with pyarrow 21 to 26, fsspec 2025.3 to 2026.9).
PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" "$python" - <<'EOF'
import importlib.metadata as md

import datasets, dill, gguf, lm_eval, multiprocess, tenacity  # noqa: F401,E401

names = ["lm_eval", "datasets", "dill", "multiprocess", "tenacity", "gguf",
         "pyarrow", "fsspec", "pandas", "huggingface-hub", "numpy", "xxhash", "transformers"]
print("install-wheels:", " ".join(f"{n}=={md.version(n)}" for n in names))
EOF
