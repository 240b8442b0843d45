"""The model's kernels, by device, each beside the torch twin it is tested against (the table in :mod:`.registry`).

- :mod:`.cpu`: C + OpenMP kernels for float32 CPU tensors (``kernels.c``), built on first use, as tensor ops.
- :mod:`.cuda`: Triton kernels for CUDA tensors, launched through one place and compiled by the gate.
- :mod:`.layout`: tcnn's hash-grid layout, which every encoding backend shares.
- :mod:`.registry`: what ``auto`` means on which device; the error a kernel failure raises and its fallback.

Imports run one way: the model (``stages/nersemble``) uses these modules; nothing here imports the model.
"""
