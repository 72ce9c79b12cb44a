"""veil.kernels: fused Triton kernels for DP-SGD per-sample clipping and noising (see kernels/README or module docstrings)."""
