"""The compile gate: every Triton kernel the model launches, compiled for real NVIDIA targets, no GPU needed.

    python benchmarks/gpu_compile.py [--presets preview,standard,paper] [--targets sm_80,...] [--workers 2]
                                     [--out benchmarks/results] [--name gpu_compile]

The launches come from the model's own launch code (``stages/nersemble/gpu_launches.py``): each preset's
encoding forward and backward (for every set of inputs that need gradients in training), compositing forward and
backward, and both marching passes. Each distinct one is compiled with ``triton.compile`` and the ptxas in the
triton wheel for sm_80, sm_86, sm_89 and sm_90, and for Blackwell (sm_100, sm_120) where that ptxas knows them;
registers and spills come from ``ptxas -v``, shared memory from the compiler. A failure names the kernel, the
preset, the variant, the target and the compiler's message. Writes ``<name>.json`` and ``<name>.md`` under
``--out`` and exits 1 if any compile failed (the test suite runs it so: ``tests/nersemble/test_gpu_compile.py``).

Run without ``TRITON_INTERPRET`` (it is removed here): the interpreter replaces the kernels it would compile.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from importlib import metadata
from multiprocessing import get_context
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, said out loud: no warning per run
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"
PRESETS = ("preview", "standard", "paper")

_launches: list | None = None


def _worker_launches(presets: tuple[str, ...]) -> list:
    global _launches  # noqa: PLW0603 - one list per worker process, built on its first job
    if _launches is None:
        from stages.nersemble.gpu_launches import preset_launches  # noqa: PLC0415

        _launches = preset_launches(presets)
    return _launches


def _compile(presets: tuple[str, ...], index: int, capability: int) -> dict:
    from stages.nersemble.kernels.cuda.compile import compile_launch  # noqa: PLC0415

    entry = _worker_launches(presets)[index]
    result = compile_launch(entry.launch, capability, entry.variant).as_dict()
    return {"preset": entry.preset, **result}


def distinct(launches: list) -> dict[tuple, list[int]]:
    """Launches that compile to the same kernel (same argument types and constexprs) share one compile."""
    groups: dict[tuple, list[int]] = {}
    for i, entry in enumerate(launches):
        launch = entry.launch
        types = tuple(str(a.dtype) if hasattr(a, "dtype") else type(a).__name__ for a in launch.args)
        key = (launch.name, types, tuple(sorted(launch.constexprs.items())))
        groups.setdefault(key, []).append(i)
    return groups


def run(presets: tuple[str, ...], targets: dict[str, int], workers: int) -> list[dict]:
    from stages.nersemble.gpu_launches import preset_launches  # noqa: PLC0415

    launches = preset_launches(presets)
    groups = distinct(launches)
    jobs = [(indices, capability) for indices in groups.values() for capability in targets.values()]
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures = [(indices, pool.submit(_compile, presets, indices[0], capability)) for indices, capability in jobs]
        rows = []
        for indices, future in futures:
            row = future.result()
            # The same compile serves every preset whose launch matched it: one row each, so a reader finds them.
            for i in indices:
                rows.append({**row, "preset": launches[i].preset, "variant": launches[i].variant})
    rows.sort(key=lambda r: (PRESETS.index(r["preset"]) if r["preset"] in PRESETS else 99, r["kernel"], r["variant"],
                             int(r["target"][3:])))
    return rows


def markdown(rows: list[dict], header: dict) -> str:
    failed = [r for r in rows if not r["ok"]]
    lines = [f"# Triton compile gate ({header['date']})", "",
             f"triton {header['triton']}, torch {header['torch']}; {len(rows)} kernel x target compiles, "
             f"{len(failed)} failed; targets {', '.join(header['targets'])}. Registers and spill bytes from "
             "`ptxas -v`, shared memory from the compiler. Command: `python benchmarks/gpu_compile.py`.", "",
             "| preset | kernel | variant | target | ok | registers | spill stores / loads (B) | shared (B) | warps |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        spills = "" if r["spill_stores"] is None else f"{r['spill_stores']} / {r['spill_loads']}"
        lines.append(f"| {r['preset']} | {r['kernel']} | {r['variant']} | {r['target']} | {'yes' if r['ok'] else 'NO'} | "
                     f"{r['registers'] if r['registers'] is not None else ''} | {spills} | "
                     f"{r['shared_bytes'] if r['shared_bytes'] is not None else ''} | {r['num_warps'] or ''} |")
    for r in failed:
        lines += ["", f"**{r['kernel']}** ({r['preset']}, {r['variant']}) on {r['target']}: `{r['error']}`"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--targets", default="", help="comma-separated sm_XY (default: every supported target)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="gpu_compile")
    args = parser.parse_args()
    from stages.nersemble.kernels.cuda.compile import supported_targets  # noqa: PLC0415

    available = supported_targets()
    wanted = [t for t in args.targets.split(",") if t] or list(available)
    unknown = [t for t in wanted if t not in available]
    if unknown:
        print(f"targets {unknown} are not built by this triton's ptxas; it builds {sorted(available)}")
        return 2
    presets = tuple(p for p in args.presets.split(",") if p)
    start = time.perf_counter()
    rows = run(presets, {t: available[t] for t in wanted}, args.workers)
    header = {"date": time.strftime("%Y-%m-%d"), "triton": metadata.version("triton"),
              "torch": metadata.version("torch"), "machine": platform.processor() or platform.machine(),
              "targets": wanted, "presets": list(presets), "seconds": round(time.perf_counter() - start, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps({**header, "rows": rows}, indent=1) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(rows, header))
    failed = [r for r in rows if not r["ok"]]
    for r in rows:
        status = "ok" if r["ok"] else f"FAILED: {r['error']}"
        print(f"{r['preset']:9s} {r['kernel']:18s} {r['variant']:26s} {r['target']:7s} regs {r['registers']} "
              f"spills {r['spill_stores']}/{r['spill_loads']} {status}")
    print(f"{len(rows) - len(failed)}/{len(rows)} compiled in {header['seconds']} s -> {args.out / args.name}.json")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
