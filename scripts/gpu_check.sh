#!/usr/bin/env bash
# Issue 12's GPU check: the one prepared script a session with a CUDA machine runs (from the repository root).
#
#   bash scripts/gpu_check.sh prepare     # on the CPU machine, before any device time: fetch the wheels to carry
#   bash scripts/gpu_check.sh all         # on the GPU machine: tests, then the 8B and the 12B benchmarks
#   bash scripts/gpu_check.sh tests       # only: kernels vs torch on CUDA, CUDA blob == CPU blob   (~1-2 min)
#   bash scripts/gpu_check.sh bench-8b    # only: Llama-3.1-8B shape, 8K x 8: restore/recompute, GB/s, generate()
#   bash scripts/gpu_check.sh bench-12b   # only: Mistral-NeMo-12B shape: 1M-token calibration, then the same
#   bash scripts/gpu_check.sh bench-8b-tf32  # optional: the 8B codec with TF32 projections (results/tf32/)
#
# The H200 image has torch (CUDA), triton, transformers, safetensors, tokenizers, numpy, scikit-learn, click, tqdm
# and pytest, but not zstandard, numba (with llvmlite) or constriction (kvcal's entropy stages): `prepare` downloads
# them as CPython 3.12 manylinux wheels into .whl/ (git-ignored through .git/info/exclude; ~55 MB, llvmlite the
# most); name `.whl` in the run's `carry`.
# Results go to $OUT/results (the device tool brings $OUT back) or results/ when OUT is unset; each bench step
# merges into the same bench_gpu.json, so the steps can run in separate calls (each under the 10-minute limit):
#   call 1: bash scripts/gpu_check.sh tests && bash scripts/gpu_check.sh bench-8b
#   call 2: bash scripts/gpu_check.sh bench-12b
# Copy $OUT/results/bench_gpu.{json,md} to results/ afterwards; nothing here writes a figure it did not measure.
set -uo pipefail
cd "$(dirname "$0")/.."
step="${1:-all}"
out="${OUT:-.}/results"
mkdir -p "$out"

if [ "$step" = prepare ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "zstandard>=0.22" "constriction>=0.4" "numba==0.68.1" "llvmlite==0.50.0"
    ls -l .whl
    exit $?
fi

if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET

python3 - <<'EOF' || exit 1
import torch, triton, transformers, constriction, zstandard, numba  # noqa: F401
assert torch.cuda.is_available(), "no CUDA device"
print(f"{torch.cuda.get_device_name()}: torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
      f"transformers {transformers.__version__}")
EOF

status=0
run_tests() {
    # Kernels compiled for this GPU against their torch references; the codec with and without them; the CUDA
    # blob against the CPU blob of the same cache (test_cuda_blob_matches_cpu_blob).
    python3 -m pytest -q -rs tests/test_kernels.py 2>&1 | tee "$out/gpu_tests.log" || status=1
}
bench_8b() {
    python3 scripts/bench_gpu.py --shapes llama-3.1-8b --calibration-shape mistral-nemo-12b \
        --codec-calib-tokens 131072 --repeats 3 --warmup 1 --out-dir "$out" --merge 2>&1 | tee "$out/bench_8b.log" || status=1
}
bench_12b() {
    python3 scripts/bench_gpu.py --shapes mistral-nemo-12b --calibration-shape mistral-nemo-12b \
        --calib-tokens 1048576 --repeats 3 --warmup 1 --out-dir "$out" --merge 2>&1 | tee "$out/bench_12b.log" || status=1
}
bench_8b_tf32() {
    mkdir -p "$out/tf32"
    KVCAL_KERNEL_PRECISION=tf32 python3 scripts/bench_gpu.py --shapes llama-3.1-8b --codec-calib-tokens 131072 \
        --repeats 3 --warmup 1 --out-dir "$out/tf32" 2>&1 | tee "$out/bench_8b_tf32.log" || status=1
}
case "$step" in
    tests) run_tests ;;
    bench-8b-tf32) bench_8b_tf32 ;;
    bench-8b) bench_8b ;;
    bench-12b) bench_12b ;;
    all) run_tests; bench_8b; bench_12b ;;
    *) echo "gpu_check.sh: unknown step $step (prepare, tests, bench-8b, bench-12b, bench-8b-tf32, all)" >&2; exit 2 ;;
esac
exit $status
