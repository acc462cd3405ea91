"""The CUDA kernels (CuPy launches of the ``.cu`` sources shipped as ``surgeon.kernels``) and the
``torch.ops.surgeon.*`` custom ops over them. Importing this package registers the ops, which is all a fresh
process needs to run a ``torch.export`` program of a merged model (``import surgeon`` alone stays light)."""

from surgeon.ops.kernels import library as _library  # noqa: F401  (registers torch.ops.surgeon.*)
