"""Hash-ensemble encoding throughput: vectorised torch backend vs the per-grid/level/corner reference.

Measures forward + backward (gradients to the tables and to the input positions, as in training) in
samples per second for the ``preview`` and ``paper`` configs, prints a table and writes
``benchmarks/results/encoding.json``. The paper config (32 grids, 16 levels, 2^19 entries: ~1.6 GB of
tables) runs at a reduced point count so the slow reference finishes in well under a minute on a CPU.

    .venv/bin/python benchmarks/encoding.py [--device cpu|cuda] [--repeats N] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.nersemble.config import preset  # noqa: E402
from stages.nersemble._reference import ReferenceHashEnsemble  # noqa: E402
from stages.nersemble.hash_encoding import TorchHashEnsemble  # noqa: E402
from stages.nersemble.kernels.registry import tcnn_available  # noqa: E402

# (preset, points per forward/backward, reference repeats): at paper size a backward pass of either backend
# is dominated by building and zeroing the 1.6 GB dense table gradient, so few points suffice.
CASES = [("preview", 16384, None), ("paper", 1024, 1)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_backend(encoding: torch.nn.Module, n_points: int, repeats: int, device: torch.device,
                 warmup: bool = True) -> list[float]:
    """Seconds per forward+backward (after one warm-up pass unless ``warmup`` is False)."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    n_grids = encoding.n_grids
    times = []
    for i in range(repeats + int(warmup)):
        x = torch.rand(n_points, 3, generator=generator).to(device).requires_grad_()
        blend = torch.randn(n_points, n_grids, generator=generator).to(device)
        encoding.zero_grad(set_to_none=True)
        _sync(device)
        start = time.perf_counter()
        out = encoding(x, blend)
        out.square().sum().backward()
        _sync(device)
        if i or not warmup:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    # One thread by default: on a shared 2-core machine OpenMP oversubscription slows the reference's
    # many small ops far more than the fused torch path, which would inflate the speedup.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads; 0 keeps torch's default")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "encoding.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    rows = []
    for name, n_points, reference_repeats in CASES:
        config = preset(name).hash
        fast = TorchHashEnsemble(config).to(device)
        reference = ReferenceHashEnsemble(config, table=fast.table)  # same parameters, other implementation
        t_fast = statistics.median(time_backend(fast, n_points, args.repeats, device))
        t_ref = statistics.median(time_backend(reference, n_points, reference_repeats or args.repeats, device,
                                               warmup=reference_repeats is None))
        rows.append({
            "preset": name, "points": n_points, "grids": config.n_grids, "levels": config.n_levels,
            "log2_table_size": config.log2_table_size, "table_entries": fast.layout.n_entries,
            "torch_samples_per_s": n_points / t_fast, "reference_samples_per_s": n_points / t_ref,
            "torch_ms": 1e3 * t_fast, "reference_ms": 1e3 * t_ref, "speedup": t_ref / t_fast,
        })
        del fast, reference

    header = f"{'preset':<8} {'points':>7} {'K x L x 2^T':>12} {'torch samp/s':>13} {'ref samp/s':>11} {'speedup':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        shape = f"{r['grids']}x{r['levels']}x2^{r['log2_table_size']}"
        print(f"{r['preset']:<8} {r['points']:>7} {shape:>12} {r['torch_samples_per_s']:>13,.0f} "
              f"{r['reference_samples_per_s']:>11,.0f} {r['speedup']:>7.1f}x")

    result = {
        "benchmark": "hash-ensemble encoding, forward + backward (table and input gradients)",
        "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.machine(), "tcnn_available": tcnn_available(), "repeats": args.repeats,
        "results": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
