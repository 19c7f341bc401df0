"""Test helpers: relative error against the fp64 reference with per-dtype thresholds, and NaN-poisoned outputs."""

from __future__ import annotations

import torch

from tritonize.kernels.reference import RELATIVE_TOLERANCE


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    denom = ref64.norm().item()
    err = (out64 - ref64).norm().item()
    return err / denom if denom > 0 else err


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None, scale: float = 1.0) -> None:
    """Fails on any NaN/Inf in out, a shape mismatch, or relative error above the dtype's threshold."""
    dtype = dtype or out.dtype
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{(~torch.isfinite(out)).sum().item()} non-finite elements (unwritten?)"
    err = relative_error(out, ref)
    tol = RELATIVE_TOLERANCE[dtype] * scale
    assert err <= tol, f"relative error {err:.3e} > {tol:.1e} for {dtype}"


def poisoned(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An output buffer full of NaN, so any element the kernel fails to write fails the check."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)
