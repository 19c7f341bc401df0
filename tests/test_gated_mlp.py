"""Fused gated MLP (SwiGLU, GeGLU from a concatenated gate/up weight) against the fp64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, poisoned

import tritonize.ops
from tritonize.kernels import reference
from tritonize.kernels.gated_mlp import gated_mlp_fwd, pick_config
from tritonize.kernels.linear import LinearConfig, linear_configs

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _inputs(M, intermediate, hidden, dtype, device, *, bias=True):
    """O(1) values: x ~ N(0, 1), gate_up_weight ~ N(0, 1/hidden), bias ~ N(0, 1)."""
    x = torch.randn(M, hidden, device=device).to(dtype)
    weight = (torch.randn(2 * intermediate, hidden, device=device) / hidden**0.5).to(dtype)
    b = torch.randn(2 * intermediate, device=device).to(dtype) if bias else None
    return x, weight, b


def _reference(x, weight, bias, activation):
    return reference.gated_mlp(x.double(), weight.double(), None if bias is None else bias.double(), activation)


def _check_fwd(x, weight, bias, activation, config=None):
    """gated_mlp_fwd into a NaN-poisoned buffer, compared with the fp64 reference."""
    out = poisoned((x.shape[0], weight.shape[0] // 2), x.dtype, x.device)
    y = gated_mlp_fwd(x, weight, bias, activation, out=out, config=config)
    assert y is out
    assert_close(y, _reference(x, weight, bias, activation), x.dtype)
    return y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", reference.GATED_ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False])
def test_activations(activation, bias, dtype, device):
    """hidden 100, intermediate 257: edges in K and in both halves' columns."""
    x, weight, b = _inputs(33, 257, 100, dtype, device, bias=bias)
    _check_fwd(x, weight, b, activation)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 7, 33])
def test_rows(M, dtype, device):
    """Decode (M <= 16, skinny tiles) and prefill rows through the public op, x 3-D."""
    x, weight, b = _inputs(M, 257, 100, dtype, device)
    y = tritonize.ops.gated_mlp(x.reshape(1, M, 100), weight, bias=b)
    assert y.shape == (1, M, 257)
    assert_close(y[0], _reference(x, weight, b, "silu"), dtype)


@pytest.mark.parametrize("M", [1, 7, 16])
def test_skinny_default_split_k(M, device):
    """Few column blocks over a long K: the heuristic splits K (on CPU against a pretend 4-SM GPU)."""
    intermediate, hidden = 40, 4096
    x, weight, b = _inputs(M, intermediate, hidden, torch.bfloat16, device)
    if device == "cpu":
        assert pick_config(M, intermediate, hidden, torch.bfloat16, torch.device(device)).split_k > 1
    _check_fwd(x, weight, b, "gelu_tanh")


@pytest.mark.parametrize("split_k", [2, 3, 8])
def test_explicit_split_k(split_k, device):
    """Several K steps per split; with 8 splits of 32 over K = 100 some splits are empty. Deterministic."""
    x, weight, b = _inputs(5, 40, 100, torch.float16, device)
    config = LinearConfig(16, 64, 32, group_m=1, split_k=split_k)
    first = _check_fwd(x, weight, b, "silu", config)
    assert torch.equal(first, gated_mlp_fwd(x, weight, b, "silu", config=config))


def test_grouped_order_and_k_loop(device):
    """Many 16 x (16 + 16) tiles in grouped order over an odd number of row blocks, a K loop of 4 steps."""
    x, weight, b = _inputs(70, 40, 50, torch.float32, device)
    _check_fwd(x, weight, b, "gelu", LinearConfig(16, 32, 16, group_m=2))


@pytest.mark.parametrize("M", [1, 65])
def test_listed_configs(M, device):
    """A sample of linear's benchmark configs (block_n counts both halves; persistent is ignored)."""
    x, weight, b = _inputs(M, 70, 136, torch.bfloat16, device)
    for config in linear_configs(M)[:: 9 if M <= 16 else 4]:
        _check_fwd(x, weight, b, "silu", config)


def test_non_contiguous(device):
    """A column-strided x, a transposed weight view and a strided bias."""
    M, intermediate, hidden = 9, 48, 64
    x = torch.randn(M, 2 * hidden, device=device)[:, ::2]
    weight = (torch.randn(hidden, 2 * intermediate, device=device) / hidden**0.5).t()
    bias = torch.randn(4 * intermediate, device=device)[::2]
    _check_fwd(x, weight, bias, "silu")
    _check_fwd(x.t().contiguous().t(), weight, None, "gelu")


def test_concat_gate_up_matches_separate_projections(device):
    """gated_mlp(x, concat_gate_up(W_gate, W_up)) is silu(x W_gate^T + b_gate) * (x W_up^T + b_up)."""
    x = torch.randn(2, 3, 32, device=device)
    gate, up = (torch.nn.Linear(32, 24, device=device) for _ in range(2))
    weight = tritonize.ops.concat_gate_up(gate.weight, up.weight)
    bias = tritonize.ops.concat_gate_up(gate.bias, up.bias)
    assert weight.shape == (48, 32) and bias.shape == (48,)
    with torch.no_grad():
        expected = F.silu(gate(x)) * up(x)
        y = tritonize.ops.gated_mlp(x, weight, bias=bias)
    assert_close(y, expected, torch.float32)


def test_empty_rows(device):
    x, weight, b = _inputs(0, 8, 16, torch.float16, device)
    assert gated_mlp_fwd(x, weight, b, "silu").shape == (0, 8)
    assert tritonize.ops.gated_mlp(x.reshape(0, 0, 16), weight).shape == (0, 0, 8)


BAD_INPUTS = {  # name: (error, call given x [4, 16], weight [16, 16] (intermediate 8), bias [16], fp32)
    "x_float64": (TypeError, lambda x, w, b: tritonize.ops.gated_mlp(x.double(), w.double())),
    "x_int": (TypeError, lambda x, w, b: tritonize.ops.gated_mlp(x.int(), w)),
    "x_not_tensor": (TypeError, lambda x, w, b: tritonize.ops.gated_mlp(x.tolist(), w)),
    "weight_dtype": (TypeError, lambda x, w, b: tritonize.ops.gated_mlp(x, w.half())),
    "bias_dtype": (TypeError, lambda x, w, b: tritonize.ops.gated_mlp(x, w, bias=b.half())),
    "weight_3d": (ValueError, lambda x, w, b: tritonize.ops.gated_mlp(x, w.reshape(16, 16, 1))),
    "weight_odd_rows": (ValueError, lambda x, w, b: tritonize.ops.gated_mlp(x, w[:15])),
    "weight_empty": (ValueError, lambda x, w, b: tritonize.ops.gated_mlp(x[:, :0], w[:, :0])),
    "mismatched_hidden": (ValueError, lambda x, w, b: tritonize.ops.gated_mlp(x[:, :15], w)),
    "bias_length": (ValueError, lambda x, w, b: tritonize.ops.gated_mlp(x, w, bias=b[:8])),
    "bias_2d": (ValueError, lambda x, w, b: tritonize.ops.gated_mlp(x, w, bias=b.reshape(16, 1))),
    "activation": (ValueError, lambda x, w, b: tritonize.ops.gated_mlp(x, w, activation="relu")),
    "concat_shapes": (ValueError, lambda x, w, b: tritonize.ops.concat_gate_up(w[:8], w[:7])),
    "concat_dtypes": (TypeError, lambda x, w, b: tritonize.ops.concat_gate_up(w[:8], w[8:].half())),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs(case, device):
    error, call = BAD_INPUTS[case]
    with pytest.raises(error):
        call(*_inputs(4, 8, 16, torch.float32, device))


def test_opcheck(device):
    x, weight, b = _inputs(3, 8, 16, torch.float32, device)
    torch.library.opcheck(torch.ops.tritonize.gated_mlp.default, (x, weight, b, "silu"))
    torch.library.opcheck(torch.ops.tritonize.gated_mlp.default, (x.reshape(1, 3, 16), weight, None, "gelu_tanh"))


def test_torch_compile_fullgraph(device):
    x, weight, b = _inputs(2, 8, 16, torch.float32, device)

    @torch.compile(backend="eager", fullgraph=True)
    def f(x, weight, b):
        return tritonize.ops.gated_mlp(x, weight, activation="gelu", bias=b) * 2

    assert_close(f(x.reshape(2, 1, 16), weight, b), _reference(x, weight, b, "gelu").reshape(2, 1, 8) * 2)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 4096])
@pytest.mark.parametrize("dtype, activation", [(torch.bfloat16, "silu"), (torch.float16, "gelu_tanh")])
def test_real_sizes(M, dtype, activation, device):
    """Llama-1B's MLP: hidden 2048, intermediate 8192."""
    x, weight, _ = _inputs(M, 8192, 2048, dtype, device, bias=False)
    _check_fwd(x, weight, None, activation)
