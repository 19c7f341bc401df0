"""tritonize: fused, readable Triton kernels for fast PyTorch transformer inference."""

from tritonize import debug, ops, parallel
from tritonize.generation import generate
from tritonize.optimize import VerificationError, optimize_model, report

__all__ = ["debug", "ops", "parallel", "generate", "optimize_model", "report", "VerificationError"]
__version__ = "0.1.0"
