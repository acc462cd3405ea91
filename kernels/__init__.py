"""CUDA kernel sources (data), shipped inside the package as surgeon.kernels."""
