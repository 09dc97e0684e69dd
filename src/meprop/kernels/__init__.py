"""Compiled kernels for meProp's sparse backward products.

``meprop.kernels.cpu`` (numba) registers ``torch.ops.meprop.topk_rows``, ``rows_matmul``,
``rows_outer`` and ``rows_outer_dense`` when imported; ``cpu.available()`` tells whether numba
could be imported, ``cpu.supports(t)`` whether a tensor suits them. Importing this package does
not import numba.
"""
