"""tritonize: fused, readable Triton kernels for fast PyTorch transformer inference."""

from tritonize import debug, ops
from tritonize.generation import generate
from tritonize.optimize import VerificationError, optimize_model, report

__all__ = ["debug", "ops", "generate", "optimize_model", "report", "VerificationError"]
__version__ = "0.1.0"
