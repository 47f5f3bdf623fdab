#!/usr/bin/env bash
# One entry point for a fresh machine: makes .venv, installs torch and this package into it
# (building the native extension), then runs a job.
#
#   ./dev.sh demo [ARGS]   train MHA and MLRA GPT-2s side by side (`mlra demo`)
#   ./dev.sh test [ARGS]   run the test suite (pytest ARGS)
#   ./dev.sh mlra ARGS     run any `mlra` command
#   ./dev.sh shell         print the line that activates the environment
#
# Environment: PYTHON (default python3), MLRA_VENV (default .venv), MLRA_TORCH (the pip requirement for
# torch, default "torch>=2.11"), MLRA_TORCH_INDEX (the index torch comes from, e.g.
# https://download.pytorch.org/whl/cpu for the CPU build), MLRA_PIP_EXTRA (more requirements installed
# with it, space-separated, e.g. "triton==3.6.0 numpy<2.4"), TORCH_CUDA_ARCH_LIST (default: the visible
# GPU, else 9.0), MLRA_SKIP_CUDA_BUILD=1, MAX_JOBS.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=${MLRA_VENV:-.venv}
STAMP="$VENV/.mlra-installed"

need_install() {
    [ ! -f "$STAMP" ] && return 0
    # Rebuild when the build files or the native sources changed since the last install.
    [ -n "$(find setup.py pyproject.toml CMakeLists.txt csrc -newer "$STAMP" -print -quit 2>/dev/null)" ]
}

default_arch_list() {
    # Build CUDA code for the GPU that is here; with none, one architecture keeps the build short.
    local cap
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 || true)
    if [ -n "$cap" ]; then echo "$cap"; else echo "9.0"; fi
}

ensure_env() {
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 10), "Python 3.10 or newer is needed"'
        echo "==> creating $VENV"
        "$PYTHON" -m venv "$VENV"
    fi
    if need_install; then
        echo "==> installing torch and build tools into $VENV"
        "$VENV/bin/python" -m pip install --upgrade pip
        read -r -a extra_reqs <<< "${MLRA_PIP_EXTRA:-}"
        local torch_req=${MLRA_TORCH:-torch>=2.11}
        if [ -n "${MLRA_TORCH_INDEX:-}" ]; then
            # torch alone from that index (https://download.pytorch.org/whl/cpu: the CPU build); its
            # dependencies and everything else come from PyPI in the install below
            "$VENV/bin/python" -m pip install --no-deps --index-url "$MLRA_TORCH_INDEX" "$torch_req"
        fi
        "$VENV/bin/python" -m pip install "$torch_req" ${extra_reqs[@]+"${extra_reqs[@]}"} \
            setuptools wheel ninja numpy
        echo "==> building mlra-kernels (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(default_arch_list)})"
        TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(default_arch_list)} MAX_JOBS=${MAX_JOBS:-2} \
            "$VENV/bin/python" -m pip install --no-build-isolation -e ".[test]"
        touch "$STAMP"
    fi
}

job=${1:-}
[ $# -gt 0 ] && shift
case "$job" in
    demo)
        ensure_env
        exec "$VENV/bin/mlra" demo "$@"
        ;;
    test)
        ensure_env
        set +e
        "$VENV/bin/python" -m pytest "$@"
        rc=$?
        set -e
        if [ "$rc" -eq 5 ]; then
            echo "error: pytest collected no tests" >&2
            exit 1
        fi
        exit "$rc"
        ;;
    mlra)
        ensure_env
        exec "$VENV/bin/mlra" "$@"
        ;;
    shell)
        ensure_env
        echo "source $VENV/bin/activate"
        ;;
    *)
        sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac
