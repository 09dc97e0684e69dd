"""Compiled kernels for meProp's sparse backward on the CPU.

* ``meprop.kernels.native``: C++ (``native.cpp``), compiled on first use with the system's
  compiler (``build``) and called through ctypes; includes a fused backward of a whole layer,
  whose large dW buffers are reused (``pool``). Preferred.
* ``meprop.kernels.cpu``: numba; the fallback where no C++ compiler works.
* ``meprop.kernels.registry``: both as ``torch.ops.meprop.*`` custom ops (fake
  implementations included) for torch.compile.

Both modules offer ``topk_rows``, ``rows_matmul``, ``rows_outer`` and ``rows_outer_dense`` with
the same semantics; ``available()`` says whether a module can run, ``supports(t)`` whether a
tensor suits it (``checks`` holds the argument checks they share). ``meprop.ops`` picks per
call. Importing this package imports neither numba nor a compiler.
"""
