"""Tensor code with no dependency on the rest of surgeon: bit packing, row quantization, derivative codebooks,
padding and layout helpers, and the CUDA kernels with their torch custom ops."""
