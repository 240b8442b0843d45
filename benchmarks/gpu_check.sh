#!/usr/bin/env bash
# The one GPU check for a lent CUDA machine (about 7 minutes of GPU time): the CUDA and Triton tests, then
# benchmarks/gpu.py (encoding, fused marching and compositing, training with each backend). Everything it writes
# lands in $OUT (default: benchmarks/results/gpu-check).
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
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
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
# Compiled kernels against the torch backend (paper config included), and the encoding suite.
timeout 240 python -m pytest -q -p no:cacheprovider -rs tests/nersemble/test_triton_cuda.py \
    tests/nersemble/test_encoding.py 2>&1 | tee "$OUT/pytest-cuda.log" || status=1
# The interpreter tests under this machine's triton (their optimize-stage cases need zarr and Prefect: deselected).
TRITON_INTERPRET=1 timeout 150 python -m pytest -q -p no:cacheprovider -rs tests/nersemble/test_triton_encoding.py \
    tests/nersemble/test_triton_packed.py -k "not encoding_triton_without" 2>&1 | tee "$OUT/pytest-interpreter.log" || status=1
timeout 420 python benchmarks/gpu.py --out "$OUT" --train-seconds 30 --train-steps 150 2>&1 \
    | tee "$OUT/benchmark.log" || status=1
exit $status
