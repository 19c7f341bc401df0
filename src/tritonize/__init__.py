"""tritonize: fused, readable Triton kernels for fast PyTorch transformer inference."""

from tritonize import debug, ops

__all__ = ["debug", "ops"]
__version__ = "0.1.0"
