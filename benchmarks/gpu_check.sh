#!/usr/bin/env bash
# The one GPU check for a lent CUDA machine, from a fresh machine with only the repository (under 8 minutes on
# one H100): the CUDA tests, the compile gate on the real device, then benchmarks/gpu.py (encoding forward +
# backward triton vs torch at `paper`, fused marching and compositing, `paper` and `standard` training steps/s
# and peak memory per backend, and a short `standard` run per backend from one seed whose loss curve and hold-out
# PSNR should track each other). Everything it writes lands in $OUT (default: benchmarks/results/gpu-check).
#
#   bash benchmarks/gpu_check.sh
#
# Needs a python3 with a CUDA build of torch (and triton, which CUDA torch wheels bring along). A venv with
# the system's site-packages keeps the machine's own CUDA torch; wheels under .whl/ (carried where no package
# index is reachable) are installed into it, else `pip install torch triton pytest` is tried. Only
# stages.nersemble is imported (torch and numpy), so neither zarr nor Prefect is needed here.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/benchmarks/results/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
VENV=${VENV:-/tmp/nersemble-gpu-venv}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET

"$PY" -m venv --system-site-packages "$VENV" && . "$VENV/bin/activate" || echo "no venv; using $PY as it is"
if compgen -G ".whl/*.whl" >/dev/null; then
    python -m pip install -q --no-index --no-deps --no-cache-dir .whl/*.whl
fi
if ! python -c "import torch, triton, pytest; assert torch.cuda.is_available()" 2>/dev/null; then
    python -m pip install -q torch triton pytest pytest-timeout || true
fi
{ nvidia-smi; python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda,
      'triton', triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')"; } \
    2>&1 | tee "$OUT/environment.txt"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "no CUDA device visible to torch: nothing to check on this machine" | tee -a "$OUT/environment.txt"; exit 1; }

status=0
# The compile gate for this device's own architecture (and the others), as the suite runs it on a CPU.
CAP=$(python -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'sm_{m}{n}')")
timeout 200 python benchmarks/gpu_compile.py --out "$OUT" --workers 8 2>&1 | tail -3 | tee "$OUT/compile-gate.log" \
    || status=1
grep -q "\"target\": \"$CAP\"" "$OUT/gpu_compile.json" 2>/dev/null \
    || echo "note: this device ($CAP) is not among the gate's targets" | tee -a "$OUT/compile-gate.log"
# Compiled kernels against the torch backend (paper config included), the encoding suite, the fallback.
timeout 200 python -m pytest -q -p no:cacheprovider -rs tests/nersemble/test_triton_cuda.py \
    tests/nersemble/test_encoding.py 2>&1 | tee "$OUT/pytest-cuda.log" || status=1
# The interpreter tests under this machine's triton (their optimize-stage cases need zarr and Prefect: deselected).
TRITON_INTERPRET=1 timeout 120 python -m pytest -q -p no:cacheprovider -rs tests/nersemble/test_triton_encoding.py \
    tests/nersemble/test_triton_packed.py -k "not encoding_triton_without" 2>&1 | tee "$OUT/pytest-interpreter.log" \
    || status=1
timeout 300 python benchmarks/gpu.py --out "$OUT" --train-seconds 20 --train-steps 150 --track-steps 300 2>&1 \
    | tee "$OUT/benchmark.log" || status=1
exit $status
