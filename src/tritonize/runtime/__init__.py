"""Runtime: the TorchDynamo backend that applies tritonize's passes (backend.py) and the CUDA-graph
replay of the result. Must never import triton; kernels are reached through `tritonize.ops` (and a new
bucket's kernels are compiled through `tritonize.kernels.compile`).
"""

from tritonize.runtime.backend import tritonize_backend

__all__ = ["tritonize_backend"]
