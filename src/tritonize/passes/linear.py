"""Linear layers -> `tritonize.ops.linear`, with the activation and residual add that follow fused in.

`linear` matches `F.linear(x, w, b)` -> [gelu | gelu(approximate="tanh") | relu | silu | tanh] ->
[+ residual of the output's shape]; `linear_plain` (stage "lower") replaces the linears no fusion
took. Skip "linear_plain" to keep cuBLAS where there is nothing to fuse. passes/ never imports triton.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from tritonize import ops
from tritonize.passes.registry import (
    ADD,
    arg,
    check,
    check_tensor,
    fake,
    is_call,
    operands,
    register_pattern,
    replace,
    same_shape,
    sole_user,
)

_GELU_APPROXIMATIONS = {"none": "gelu", "tanh": "gelu_tanh"}


def fusable_activation(node: fx.Node) -> str | None:
    """The ops.linear activation name that node computes on its first argument, or None."""
    if is_call(node, F.gelu):
        return _GELU_APPROXIMATIONS.get(arg(node, 1, "approximate", "none"))
    if is_call(node, torch.relu, F.relu, "relu"):
        return "relu"
    if is_call(node, F.silu):
        return "silu"
    if is_call(node, torch.tanh, F.tanh, "tanh"):
        return "tanh"
    return None


def fusable_residual(node: fx.Node, out: fx.Node) -> fx.Node | None:
    """r when node computes `out + r` (either order) with r of out's shape and dtype, else None."""
    pair = operands(node, ADD)
    if pair is None or not any(v is out for v in pair):
        return None
    residual = pair[1] if pair[0] is out else pair[0]
    out_value, res_value, sum_value = fake(out), fake(residual), fake(node)
    if residual is out or res_value is None or sum_value is None:
        return None
    fits = same_shape(res_value, out_value) and same_shape(sum_value, out_value)
    return residual if fits and res_value.dtype == out_value.dtype == sum_value.dtype else None


def linear_args(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None]:
    """(x, weight, bias) of an F.linear node, after checking ops.linear takes them (Reject otherwise)."""
    x, weight, bias = arg(node, 0, "input"), arg(node, 1, "weight"), arg(node, 2, "bias")
    x_value, w_value = check_tensor("x", x), check_tensor("weight", weight)
    check(1 <= x_value.dim() <= 8, f"x has {x_value.dim()} dims; ops.linear takes 1 to 8")
    check(w_value.dim() == 2 and w_value.numel() > 0, f"weight has shape {tuple(w_value.shape)}")
    check(w_value.dtype == x_value.dtype, f"weight dtype {w_value.dtype} differs from x dtype {x_value.dtype}")
    devices = {x_value.device, w_value.device}
    if bias is not None:
        b_value = check_tensor("bias", bias)
        check(b_value.dim() == 1 and b_value.dtype == x_value.dtype, "bias is not a 1-D tensor of x's dtype")
        devices.add(b_value.device)
    check(len(devices) == 1, f"x, weight and bias are on different devices {devices}")
    return x, weight, bias


@register_pattern("linear", name="linear")
def linear_epilogue(node: fx.Node) -> bool:
    """linear -> activation and/or -> + residual, as one ops.linear call."""
    if not is_call(node, F.linear):
        return False
    end, activation, residual = node, None, None
    user = sole_user(end)
    if user is not None and (activation := fusable_activation(user)) is not None:
        end, user = user, sole_user(user)
    if user is not None and (residual := fusable_residual(user, end)) is not None:
        end = user
    if end is node:
        return False
    x, weight, bias = linear_args(node)
    if residual is not None:
        res_value = check_tensor("residual", residual)
        check(res_value.device == fake(x).device, f"residual is on {res_value.device}, x on {fake(x).device}")
    replace(end, ops.linear, x, weight, bias, activation=activation, residual=residual)
    return True


@register_pattern("linear", stage="lower")
def linear_plain(node: fx.Node) -> bool:
    """A linear with nothing to fuse -> ops.linear."""
    if not is_call(node, F.linear):
        return False
    replace(node, ops.linear, *linear_args(node))
    return True
