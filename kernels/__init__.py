"""Backend kernels, one module per backend, imported lazily by name.

``fastbp.kernels.base`` holds the contract; ``numpy``, ``numba`` and ``cupy``
implement it. Importing this package imports none of the heavy backends.
"""
