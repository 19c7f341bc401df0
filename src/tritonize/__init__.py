"""tritonize: fused, readable Triton kernels for fast PyTorch transformer inference."""

from tritonize import ops

__all__ = ["ops"]
__version__ = "0.1.0"
