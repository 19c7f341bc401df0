"""The decode matrix-vector kernel (kernels/gemv.py) and the RMSNorm-fused ops built on it, against fp64
references: odd sizes, every row count it takes, NaN-poisoned outputs, bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_close, poisoned, run_python

import tritonize.ops
from tritonize.kernels import gemv as gemv_module
from tritonize.kernels import reference
from tritonize.kernels.gemv import GEMV_MAX_M, GemvConfig, gemv_fwd, supports

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _normed(x, norm_weight, eps):
    """The "llama" RMSNorm in x's dtype (the rounding the fused prologue reproduces), as fp64."""
    return reference.rms_norm(x, norm_weight, eps)[0].double()


def _inputs(M, N, K, dtype, device, *, gated=False):
    x = torch.randn(M, K, device=device).to(dtype)
    weight = (torch.randn((2 if gated else 1) * N, K, device=device) / K**0.5).to(dtype)
    bias = torch.randn((2 if gated else 1) * N, device=device).to(dtype)
    norm_weight = (torch.rand(K, device=device) + 0.5).to(dtype)
    return x, weight, bias, norm_weight


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", list(range(1, GEMV_MAX_M + 1)))
@pytest.mark.parametrize(("N", "K"), [(37, 100), (130, 300)])
def test_linear_epilogue(M, N, K, dtype, device):
    """Bias, activation and residual; N and K not multiples of the blocks (column wrap, K mask)."""
    x, weight, bias, _ = _inputs(M, N, K, dtype, device)
    residual = torch.randn(M, N, device=device).to(dtype)
    out = poisoned((M, N), dtype, device)
    y = gemv_fwd(x, weight, bias, "gelu_tanh", residual, out=out)
    assert y is out
    ref = reference.linear(x.double(), weight.double(), bias.double(), "gelu_tanh", residual.double())
    assert_close(y, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, GEMV_MAX_M])
def test_rms_norm_prologue(M, dtype, device):
    """The norm computed per program over all of K (two K blocks and a ragged tail) equals rms_norm then linear."""
    x, weight, bias, norm_weight = _inputs(M, 70, 300, dtype, device)
    x = x * 5 + 2  # rows far from unit RMS: a missing normalization shows
    out = poisoned((M, 70), dtype, device)
    gemv_fwd(x, weight, None, None, None, rms_norm_weight=norm_weight, rms_norm_eps=1e-5, out=out,
             config=GemvConfig(block_n=16, block_k=128))
    ref = reference.linear(_normed(x, norm_weight, 1e-5), weight.double(), None, None, None)
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", reference.GATED_ACTIVATIONS)
@pytest.mark.parametrize("norm", [True, False])
def test_gated(activation, norm, dtype, device):
    """act(gate) * up from cat([W_gate, W_up]): gate rows n and up rows N + n, with and without the norm."""
    x, weight, bias, norm_weight = _inputs(2, 57, 100, dtype, device, gated=True)
    out = poisoned((2, 57), dtype, device)
    gemv_fwd(x, weight, bias, activation, None, gated=True, rms_norm_weight=norm_weight if norm else None,
             rms_norm_eps=1e-6, out=out)
    x_in = _normed(x, norm_weight, 1e-6) if norm else x.double()
    assert_close(out, reference.gated_mlp(x_in, weight.double(), bias.double(), activation), dtype)


def test_strided_rows(device):
    """x and weight rows further apart than K (views into wider tensors), residual transposed."""
    x_wide, w_wide = torch.randn(GEMV_MAX_M, 80, device=device), torch.randn(50, 96, device=device) / 8
    residual = torch.randn(50, GEMV_MAX_M, device=device).T
    x, weight = x_wide[:, :64], w_wide[:, :64]
    assert supports(x, weight)
    y = gemv_fwd(x, weight, None, None, residual)
    assert_close(y, reference.linear(x.double(), weight.double(), None, None, residual.double()))


def test_supports_and_errors(device):
    x, weight = torch.randn(GEMV_MAX_M + 1, 16, device=device), torch.randn(8, 16, device=device)
    assert not supports(x, weight)
    assert not supports(x[:1], weight.T.contiguous().T)  # K not contiguous in the weight
    with pytest.raises(ValueError, match="at most"):
        gemv_fwd(x, weight, None, None, None)
    with pytest.raises(ValueError, match="no residual"):
        gemv_fwd(x[:1], torch.randn(16, 16, device=device), None, "silu", torch.randn(1, 8, device=device),
                 gated=True)


def test_weights_past_the_cards_limit_take_the_tensor_core_path(monkeypatch, device):
    """A card listed in MAX_WEIGHT_BYTES keeps its larger weights off the GEMV; the size counts every row."""
    monkeypatch.setattr(gemv_module, "card_name", lambda device: "a card")
    monkeypatch.setitem(gemv_module.MAX_WEIGHT_BYTES, "a card", 1 << 20)
    x = torch.randn(1, 1024, device=device)
    at_limit, past = (torch.empty(1, 1024, device=device).expand(rows, 1024) for rows in (256, 257))  # 4 B a value
    assert gemv_module.preferred(x, at_limit) and not gemv_module.preferred(x, past)
    assert supports(x, past)  # still runs there when called directly
    monkeypatch.delitem(gemv_module.MAX_WEIGHT_BYTES, "a card")
    assert gemv_module.preferred(x, past)  # an unlisted card: no limit


@pytest.mark.parametrize("M", [1, GEMV_MAX_M + 3])
def test_public_ops_both_paths(M, device):
    """ops.linear / gated_mlp take the GEMV at decode sizes, and rms_norm_linear / rms_norm_gated_mlp equal the
    composition of rms_norm and the projection on both sides of GEMV_MAX_M (one kernel, then two)."""
    dtype = torch.bfloat16
    x, weight, bias, norm_weight = _inputs(M, 45, 64, dtype, device)
    x3 = x.reshape(1, M, 64)
    y = tritonize.ops.rms_norm_linear(x3, norm_weight, weight, bias, eps=1e-5)
    assert y.shape == (1, M, 45)
    ref = reference.linear(_normed(x, norm_weight, 1e-5), weight.double(), bias.double(), None, None)
    assert_close(y[0], ref, dtype)
    assert_close(tritonize.ops.linear(x3, weight, bias)[0],
                 reference.linear(x.double(), weight.double(), bias.double(), None, None), dtype)

    _, gate_up, gate_up_bias, _ = _inputs(M, 45, 64, dtype, device, gated=True)
    z = tritonize.ops.rms_norm_gated_mlp(x3, norm_weight, gate_up, eps=1e-5, bias=gate_up_bias)
    assert z.shape == (1, M, 45)
    assert_close(z[0], reference.gated_mlp(_normed(x, norm_weight, 1e-5), gate_up.double(), gate_up_bias.double(),
                                           "silu"), dtype)


def test_fused_ops_bad_input(device):
    x, weight, bias, norm_weight = _inputs(1, 8, 16, torch.float32, device)
    with pytest.raises(ValueError, match="norm_weight must have shape"):
        tritonize.ops.rms_norm_linear(x, norm_weight[:8], weight)
    with pytest.raises(ValueError, match="features"):
        tritonize.ops.rms_norm_linear(x, norm_weight, weight[:, :8])
    with pytest.raises(ValueError, match="eps"):
        tritonize.ops.rms_norm_linear(x, norm_weight, weight, eps=-1.0)
    with pytest.raises(TypeError, match="dtype|float16"):
        tritonize.ops.rms_norm_linear(x, norm_weight, weight.half())
    with pytest.raises(ValueError, match="activation"):
        tritonize.ops.rms_norm_gated_mlp(x, norm_weight, torch.randn(16, 16, device=device), activation="relu6")
    with pytest.raises(ValueError, match="2 \\* intermediate"):
        tritonize.ops.rms_norm_gated_mlp(x, norm_weight, torch.randn(15, 16, device=device))


OCCUPANCY_SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gemv_occupancy.py"


def test_occupancy_script_compiles_for_sm90_without_a_gpu(tmp_path):
    """benchmarks/gemv_occupancy.py compiles each Llama projection's GEMV for sm_90 (no GPU needed) and its
    programs per SM and waves follow from the registers it reads off the cubin."""
    out = tmp_path / "occupancy.json"
    done = run_python(str(OCCUPANCY_SCRIPT), "--batch", "2", "--sms", "100", "--json", str(out), interpret=False)
    assert done.returncode == 0, done.stderr[-3000:]
    table = json.loads(out.read_text())
    assert (table["batch"], table["sms"]) == (2, 100)
    assert set(table["rows"]) == {"qkv", "o", "gate_up", "down", "lm_head"}
    for name, row in table["rows"].items():
        assert 0 < row["registers_per_thread"] <= 255, name
        warps = int(row["config"].split("num_warps=")[1].split(",")[0])
        per_warp = -(-row["registers_per_thread"] * 32 // 256) * 256
        assert row["programs_per_sm"] == min(65536 // (per_warp * warps), 2048 // (32 * warps), 32), name
        assert row["waves"] == pytest.approx(row["programs"] / (row["programs_per_sm"] * 100)), name
        assert f"| {name} | {row['N']} x {row['K']} |" in done.stdout


def test_occupancy_script_refuses_the_interpreter():
    done = run_python(str(OCCUPANCY_SCRIPT), interpret=True)
    assert done.returncode == 2 and "without TRITON_INTERPRET" in done.stderr


@pytest.mark.gpu
@pytest.mark.parametrize(("N", "K"), [(3072, 2048), (2048, 5632), (32000, 2048)])
def test_llama_shapes_gpu(N, K):
    """The 1.7 GB Llama's decode shapes in bf16 with the shape heuristic's configs, fused norm."""
    x, weight, bias, norm_weight = _inputs(1, N, K, torch.bfloat16, "cuda")
    out = poisoned((1, N), torch.bfloat16, "cuda")
    gemv_fwd(x, weight, None, None, None, rms_norm_weight=norm_weight, rms_norm_eps=1e-6, out=out)
    ref = reference.linear(_normed(x, norm_weight, 1e-6), weight.double(), None, None, None)
    assert_close(out, ref, torch.bfloat16)


def test_ab_script_variants():
    """benchmarks/ab_decode_gemv.py: variants parse into per-projection GemvConfig changes (or another copy of
    the kernel), applied over the shipped choice by the projection's (N, K); malformed ones are refused."""
    sys.path.insert(0, str(OCCUPANCY_SCRIPT.parent))
    try:
        import ab_decode_gemv as ab
    finally:
        sys.path.remove(str(OCCUPANCY_SCRIPT.parent))
    name, changes = ab.parse_variant("mixed=*.num_warps=8,gate_up.num_warps=2,gate_up.block_k=512")
    assert name == "mixed"
    assert changes == {"*": {"num_warps": 8}, "gate_up": {"num_warps": 2, "block_k": 512}}
    assert ab.parse_variant("shipped=") == ("shipped", {})
    assert ab.parse_variant("before=@old/gemv.py") == ("before", Path("old/gemv.py"))
    for bad in ("no-settings", "x=qkv.block_q=2", "x=attention.block_k=2", "x=qkv.block_k=wide"):
        with pytest.raises(ValueError, match="variant"):
            ab.parse_variant(bad)
    shapes = {(3072, 2048): "qkv", (5632, 2048): "gate_up"}
    pick = ab.config_picker(changes, shapes, gemv_module.pick_config)
    shipped = gemv_module.pick_config(1, 5632, 2048, torch.bfloat16)
    assert pick(1, 5632, 2048, torch.bfloat16) == GemvConfig(shipped.block_n, 512, 2, shipped.num_stages)
    qkv = pick(1, 3072, 2048, torch.bfloat16)
    assert (qkv.num_warps, qkv.block_k) == (8, gemv_module.pick_config(1, 3072, 2048, torch.bfloat16).block_k)
    assert pick(1, 100, 64, torch.bfloat16).num_warps == 8  # a shape of no named projection: "*" only
