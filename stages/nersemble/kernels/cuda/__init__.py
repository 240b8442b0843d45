"""Triton kernels for CUDA: the hash-ensemble encoding (:mod:`.hash_encoding`), marching and compositing
(:mod:`.packed`), how they launch (:mod:`.launch`) and the compile gate (:mod:`.compile`). Importing any of them
imports triton, which is optional: the model imports them only when the ``triton`` encoding is chosen."""
