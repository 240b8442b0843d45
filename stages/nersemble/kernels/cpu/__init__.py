"""C kernels for the CPU (OpenMP), built on first use (:mod:`.build`) and called as tensor ops (:mod:`.ops`)."""
