#!/usr/bin/env bash
# GPU checks and the end-to-end benchmark, run on the GPU machine from the repository root:
#   bash scripts/gpu_check.sh [extra args for `python -m ksdk.bench e2e`]
# Installs the project (building the native CPU experts), runs the kernel tests natively on the GPU (the same
# grids CI runs in Triton's interpreter), the GPU-only tests, the decode-GEMV tile sweep, then the benchmark.
# Prints everything and exits non-zero if any step failed, after running the rest. QUICK=1 skips the install
# (done already), the interpreter tests and the tile sweep, for a short device call. The benchmark decodes from
# whole-step CUDA graphs by default; `--graphs attention,step` prints the per-layer attention-graph table
# (eager MoE layers) before it, for comparison.
set -u -o pipefail
PYTHON="${PYTHON:-python}"
failed=()

step() {
    echo
    echo "==== $* ===="
    if ! "$@"; then
        failed+=("$*")
    fi
}

step nvidia-smi
step "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
if [[ "${QUICK:-0}" != 1 ]]; then
    step "$PYTHON" -m pip install --no-deps --no-build-isolation -e .
    step "$PYTHON" -m pytest -q -p no:cacheprovider -m "not gpu" tests/kernels
fi
step "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider tests/kernels tests/models
if [[ "${QUICK:-0}" != 1 ]]; then
    step "$PYTHON" scripts/gemv_sweep.py 1,4
fi
step "$PYTHON" -m ksdk.bench e2e "$@"

echo
if ((${#failed[@]})); then
    printf 'FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "all GPU checks passed"
