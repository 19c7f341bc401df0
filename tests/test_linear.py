"""Fused linear kernel (activation(x @ W^T + bias) + residual) against the fp64 reference."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import triton
import triton.language as tl
from helpers import LaunchRecorder, assert_close, assert_pdl_waits_first, poisoned, sm90_ptx

import tritonize.ops
from tritonize.kernels import linear as linear_module
from tritonize.kernels import reference
from tritonize.kernels.linear import (
    LinearConfig,
    _pick_config,
    linear_configs,
    linear_epilogue_fwd,
    linear_fwd,
    linear_layer_norm_fwd,
)
from tritonize.kernels.norm import layer_norm_fwd

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ACTIVATIONS = (None, *reference.ACTIVATIONS)


def _inputs(M, N, K, dtype, device, *, bias=True, residual=True):
    """O(1) values: x ~ N(0, 1), weight ~ N(0, 1/K)."""
    x = torch.randn(M, K, device=device).to(dtype)
    weight = (torch.randn(N, K, device=device) / K**0.5).to(dtype)
    b = torch.randn(N, device=device).to(dtype) if bias else None
    r = torch.randn(M, N, device=device).to(dtype) if residual else None
    return x, weight, b, r


def _reference(x, weight, bias, activation, residual):
    def fp64(t):
        return None if t is None else t.double()

    return reference.linear(fp64(x), fp64(weight), fp64(bias), activation, fp64(residual))


def _check_fwd(x, weight, bias, activation, residual, config=None):
    """linear_fwd into a NaN-poisoned buffer, compared with the fp64 reference."""
    out = poisoned((x.shape[0], weight.shape[0]), x.dtype, x.device)
    y = linear_fwd(x, weight, bias, activation, residual, out=out, config=config)
    assert y is out
    assert_close(y, _reference(x, weight, bias, activation, residual), x.dtype)
    return y


@pytest.fixture
def launches(monkeypatch):
    """The list of (kernel name, grid) that linear_fwd launches during the test."""
    record = []
    for name in ("_linear_kernel", "_linear_persistent_kernel"):
        monkeypatch.setattr(linear_module, name, LaunchRecorder(getattr(linear_module, name), name, record))
    return record


# -- epilogues and dtypes -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias, residual", [(True, True), (False, False)])
def test_epilogue(activation, bias, residual, dtype, device):
    x, weight, b, r = _inputs(33, 70, 100, dtype, device, bias=bias, residual=residual)
    _check_fwd(x, weight, b, activation, r)


@pytest.mark.parametrize("bias, residual", [(True, False), (False, True)])
def test_bias_or_residual_alone(bias, residual, device):
    x, weight, b, r = _inputs(20, 48, 64, torch.float16, device, bias=bias, residual=residual)
    _check_fwd(x, weight, b, "gelu", r)


# -- shapes and paths -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M, N, K", [(1, 1, 33), (33, 33, 100), (2, 257, 33), (65, 130, 200), (17, 1, 16)])
def test_odd_shapes(M, N, K, dtype, device):
    x, weight, b, r = _inputs(M, N, K, dtype, device)
    _check_fwd(x, weight, b, "gelu_tanh", r)


@pytest.mark.parametrize("M", [1, 7, 16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_skinny_default_split_k(M, dtype, device):
    """M <= 16 on few column blocks: the heuristic splits K (on CPU against a pretend 4-SM GPU)."""
    N, K = 64, 4096
    x, weight, b, r = _inputs(M, N, K, dtype, device)
    if device == "cpu":
        assert _pick_config(M, N, K, dtype, torch.device(device)).split_k > 1
    _check_fwd(x, weight, b, "silu", r)


@pytest.mark.parametrize("split_k", [2, 3, 8])
def test_explicit_split_k(split_k, device):
    """Small blocks: several K steps per split; with 8 splits of 32 over K = 100 some splits are empty."""
    x, weight, b, r = _inputs(5, 40, 100, torch.float16, device)
    config = LinearConfig(16, 32, 32, group_m=1, split_k=split_k)
    first = _check_fwd(x, weight, b, "relu", r, config)
    assert torch.equal(first, linear_fwd(x, weight, b, "relu", r, config=config)), "split-K must be deterministic"


def test_grouped_order_and_k_loop(device):
    """Many 16x16 tiles with GROUP_M = 2 over an odd number of row blocks, and a K loop of 4 steps."""
    x, weight, b, r = _inputs(70, 40, 50, torch.float32, device)
    _check_fwd(x, weight, b, "tanh", r, LinearConfig(16, 16, 16, group_m=2))


@pytest.mark.parametrize("M", [1, 65])
def test_listed_configs(M, device, launches):
    """Every config a benchmark may sweep (a sample of the skinny ones) computes the same function;
    K = 296 bf16 rows are 16-byte aligned, so the persistent ones take the TMA kernel."""
    x, weight, b, r = _inputs(M, 70, 296, torch.bfloat16, device)
    configs = linear_configs(M)
    for config in configs if M > 16 else configs[::9]:
        launches.clear()
        _check_fwd(x, weight, b, "gelu", r, config)
        assert launches[0][0] == ("_linear_persistent_kernel" if config.persistent else "_linear_kernel")
    assert M <= 16 or any(config.persistent for config in configs)


def test_non_contiguous(device):
    """Transposed views of x, weight and residual, and a column-strided x."""
    M, N, K = 33, 40, 64
    x = torch.randn(K, M, device=device).t()
    weight = (torch.randn(K, N, device=device) / K**0.5).t()
    residual = torch.randn(N, M, device=device).t()
    bias = torch.randn(2 * N, device=device)[::2]
    _check_fwd(x, weight, bias, "gelu", residual)
    x_strided = torch.randn(M, 2 * K, device=device)[:, ::2]
    _check_fwd(x_strided, weight, None, None, None)


# -- layer norm in the split-K reduce (linear_layer_norm_fwd) ------------------------------------------


def _layer_norm_reference(x, weight, bias, residual, norm_weight, norm_bias, eps):
    """fp64 LayerNorm of the fp64 product with the residual, the sum first rounded to x's dtype as stored."""
    h = _reference(x, weight, bias, None, residual).to(x.dtype).double()
    return reference.layer_norm(h, *(None if p is None else p.double() for p in (norm_weight, norm_bias)), eps)[0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M, N, K, split_k", [(1, 40, 100, 2), (7, 257, 64, 3), (16, 1000, 48, 2), (33, 24, 200, 4)])
@pytest.mark.parametrize("affine", ["weight_bias", "none"])
def test_layer_norm_in_the_split_k_reduce(M, N, K, split_k, affine, dtype, device, launches):
    """The reduce of the partial sums also normalizes whole rows: against fp64, into a NaN-poisoned output,
    with no norm kernel launched; in fp32 bit-equal to the product then the norm kernel."""
    x, weight, b, r = _inputs(M, N, K, dtype, device)
    x = x + 3.0  # a large common offset in each row: the two-pass variance must not lose it
    norm_weight, norm_bias = (torch.randn(N, device=device).to(dtype) for _ in range(2))
    if affine == "none":
        norm_weight = norm_bias = None
    config = LinearConfig(16, 32, 16, group_m=1, split_k=split_k)
    out = poisoned((M, N), dtype, device)
    y = linear_fwd(x, weight, b, None, r, out=out, config=config, layer_norm=(norm_weight, norm_bias, 1e-5))
    assert y is out and [name for name, _ in launches] == ["_linear_kernel"]
    assert_close(y, _layer_norm_reference(x, weight, b, r, norm_weight, norm_bias, 1e-5), dtype)
    fused = linear_layer_norm_fwd(x, weight, b, r, norm_weight, norm_bias, 1e-5, config=config)
    if dtype == torch.float32:
        unfused = layer_norm_fwd(linear_fwd(x, weight, b, None, r, config=config), norm_weight, norm_bias, 1e-5)[0]
        assert torch.equal(fused, unfused)


def test_layer_norm_reduce_compiles_for_sm90_and_waits_first():
    """The split-K reduce with the layer norm (bert-base's N = 768 in 1024-wide rows, PDL on) compiles for
    sm_90 without a GPU, and waits for the product kernel before reading its partial sums."""
    types = {name: "*fp16" for name in ("B_ptr", "R_ptr", "Y_ptr", "NW_ptr", "NB_ptr")}
    types.update(Partial_ptr="*fp32", eps="fp32")
    constexprs = dict(HAS_BIAS=True, ACTIVATION="none", HAS_RESIDUAL=True, SPLIT_K=4, LAYER_NORM=True,
                      HAS_NORM_WEIGHT=True, HAS_NORM_BIAS=True, BLOCK_M=2, BLOCK_N=1024, PDL=True)
    assert_pdl_waits_first(sm90_ptx("tritonize.kernels.linear", "_split_k_reduce_kernel", types, constexprs))


def _linear_kernel_ptx(**changes) -> str:
    types = {name: "*fp16" for name in ("X_ptr", "W_ptr", "B_ptr", "R_ptr", "Y_ptr")}
    types.update(Partial_ptr="*fp32")
    constexprs = dict(HAS_BIAS=True, ACTIVATION="gelu", HAS_RESIDUAL=False, SPLIT_K=1, INPUT_PRECISION="tf32",
                      BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, GROUP_M=1, EVEN_K=True, PDL=True, PREFETCH_WEIGHT=True)
    return sm90_ptx("tritonize.kernels.linear", "_linear_kernel", types, {**constexprs, **changes})


def test_weight_prefetch_compiles_for_sm90_before_the_wait():
    """With PDL, the tiled kernel (bert-base's 16-row GELU up projection config) prefetches its weight into L2
    before waiting for the previous kernel, and loads nothing before the wait; without PREFETCH_WEIGHT, no
    prefetch."""
    ptx = _linear_kernel_ptx()
    assert_pdl_waits_first(ptx)
    body = ptx[ptx.index(".entry"):]
    assert 0 <= body.find("prefetch.global.L2") < body.find("griddepcontrol.wait")
    assert "prefetch.global" not in _linear_kernel_ptx(PREFETCH_WEIGHT=False)


@triton.jit
def _line_columns_kernel(Out_ptr, k_start, k_end, BLOCK_K: tl.constexpr, LINE: tl.constexpr, STEPS: tl.constexpr):
    offs = tl.arange(0, max(1, BLOCK_K // LINE))
    for step in range(STEPS):
        k = k_start + step * BLOCK_K
        tl.store(Out_ptr + step * offs.shape[0] + offs, linear_module._line_columns(k, k_end, BLOCK_K, LINE))


@pytest.mark.parametrize("k_start, k_end, block_k, line", [(0, 768, 256, 64), (256, 700, 128, 64), (3, 40, 16, 32),
                                                         (0, 100, 64, 64), (64, 65, 128, 64)])
def test_prefetch_addresses_cover_the_slice_in_bounds(k_start, k_end, block_k, line, device):
    """The weight prefetch's columns touch every L2 line of [k_start, k_end) (the K loop's steps of block_k)
    and never a column at or past k_end."""
    steps = -(-(k_end - k_start) // block_k)
    out = torch.full((steps, max(1, block_k // line)), -1, dtype=torch.int32, device=device)
    _line_columns_kernel[(1,)](out, k_start, k_end, BLOCK_K=block_k, LINE=line, STEPS=steps)
    cols = out.flatten().tolist()
    assert all(k_start <= c < k_end for c in cols)
    # a line is [j * line, (j + 1) * line) counted from the step's start, as the K loop's loads are aligned
    assert {c // line for c in cols} >= {c // line for c in range(k_start, k_end) if (c - k_start) % line == 0}


@pytest.mark.parametrize("config", [LinearConfig(16, 32, 16, group_m=1), None])
def test_linear_layer_norm_without_a_split_runs_the_norm_kernel(config, device, monkeypatch):
    """An unsplit config (given, or the heuristic's for these shapes) runs the product, then the norm kernel."""
    x, weight, b, r = _inputs(20, 40, 32, torch.float32, device)
    norm_weight, norm_bias = torch.randn(40, device=device), torch.randn(40, device=device)
    if config is None:
        assert _pick_config(20, 40, 32, torch.float32, torch.device(device)).split_k == 1
    norms = []
    monkeypatch.setattr(linear_module, "layer_norm_fwd", lambda *a, **k: norms.append(1) or layer_norm_fwd(*a, **k))
    y = linear_layer_norm_fwd(x, weight, b, r, norm_weight, norm_bias, 1e-5, config=config)
    assert norms == [1]
    assert_close(y, _layer_norm_reference(x, weight, b, r, norm_weight, norm_bias, 1e-5), torch.float32)


def test_layer_norm_needs_a_split_reduce(device):
    x, weight, b, r = _inputs(4, 40, 32, torch.float32, device)
    norm = (None, None, 1e-5)
    with pytest.raises(ValueError, match="only in a split-K reduce"):
        linear_fwd(x, weight, b, None, r, config=LinearConfig(16, 32, 16), layer_norm=norm)
    wide = _inputs(4, linear_module.MAX_FUSED_NORM_COLS + 1, 16, torch.float32, device)
    with pytest.raises(ValueError, match="at most 8192 columns"):
        linear_fwd(*wide[:3], None, wide[3], config=LinearConfig(16, 32, 16, split_k=2), layer_norm=norm)


# -- persistent TMA kernel (M > 16) ---------------------------------------------------------------

# Small tiles, so that on CPU (a pretend 4-SM GPU) every program loops over several tiles.
SMALL_PERSISTENT = LinearConfig(32, 32, 32, group_m=2, persistent=True)


@pytest.mark.parametrize(
    "M, N, K, dtype, config",
    [
        (33, 40, 64, torch.float32, LinearConfig(16, 16, 16, group_m=2, persistent=True)),
        (33, 257, 136, torch.float16, SMALL_PERSISTENT),
        (200, 40, 300, torch.float32, SMALL_PERSISTENT),
        (200, 257, 296, torch.float16, dataclasses.replace(SMALL_PERSISTENT, programs_per_sm=2)),
        (200, 257, 296, torch.bfloat16, None),  # the heuristic's tiles
    ],
)
def test_persistent_odd_shapes(M, N, K, dtype, config, device, launches):
    """Edges in M, N and K zero-filled by the descriptors; tiles strided over the programs."""
    x, weight, b, r = _inputs(M, N, K, dtype, device)
    config = config or _pick_config(M, N, K, dtype, torch.device(device))
    assert config.persistent
    _check_fwd(x, weight, b, "gelu", r, config)
    sm_count = linear_module._device_limits(torch.device(device))[0]
    tiles = linear_module._num_tiles(config, M, N)
    programs = sm_count * config.programs_per_sm
    assert launches == [("_linear_persistent_kernel", (min(programs, tiles),))]
    if device == "cpu":
        assert tiles > 2 * programs, "each program should loop over several tiles"


@pytest.mark.parametrize(
    "activation, dtype, bias, residual",
    [
        (None, torch.float32, False, False),
        ("relu", torch.float16, True, False),
        ("gelu", torch.bfloat16, False, True),
        ("gelu_tanh", torch.float32, True, True),
        ("silu", torch.float16, True, True),
        ("tanh", torch.bfloat16, True, True),
    ],
)
def test_persistent_epilogues(activation, dtype, bias, residual, device, launches):
    x, weight, b, r = _inputs(40, 72, 64, dtype, device, bias=bias, residual=residual)
    _check_fwd(x, weight, b, activation, r, SMALL_PERSISTENT)
    assert [name for name, _ in launches] == ["_linear_persistent_kernel"]


def test_persistent_residual_strides(device, launches):
    """A transposed residual in the persistent epilogue (residual strides are free, unlike x's)."""
    x, weight, b, _ = _inputs(48, 40, 64, torch.float16, device)
    residual = torch.randn(40, 48, device=device).to(torch.float16).t()
    _check_fwd(x, weight, b, "silu", residual)
    assert [name for name, _ in launches] == ["_linear_persistent_kernel"]


def _misaligned(t):
    """A contiguous copy of t whose data starts one element past a 16-byte boundary."""
    view = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape)
    return view.copy_(t)


NOT_TMA = {  # name: (x, weight) -> the same values in a layout TMA cannot read
    "x_transposed": lambda x, w: (x.t().contiguous().t(), w),
    "x_column_strided": lambda x, w: (x.repeat_interleave(2, dim=1)[:, ::2], w),
    "x_misaligned_base": lambda x, w: (_misaligned(x), w),
    "rows_not_16_bytes": lambda x, w: (x[:, :60].contiguous(), w[:, :60].contiguous()),  # 120-byte rows
    "weight_transposed": lambda x, w: (x, w.t().contiguous().t()),
}


@pytest.mark.parametrize("case", NOT_TMA)
def test_persistent_falls_back_to_pointers(case, device, launches):
    """A persistent config on a layout TMA cannot read runs the tiled pointer kernel instead."""
    M, N, K, dtype = 40, 48, 64, torch.float16
    x, weight, b, r = _inputs(M, N, K, dtype, device)
    x, weight = NOT_TMA[case](x, weight)
    assert _pick_config(M, N, x.shape[1], dtype, torch.device(device)).persistent
    _check_fwd(x, weight, b, "gelu", r)
    assert [name for name, _ in launches] == ["_linear_kernel"]


def test_persistent_config_rules(device):
    """Persistent exactly for unsplit M > 16 whose tiles fill every SM on a GPU (always on CPU, to test it);
    decode and split-K keep their kernels."""
    with pytest.raises(ValueError):
        LinearConfig(128, 128, 64, split_k=2, persistent=True)
    with pytest.raises(ValueError, match="programs_per_sm"):
        LinearConfig(128, 128, 64, programs_per_sm=2)  # the tiled kernel's grid has one program per tile
    dev = torch.device(device)
    sm_count, _, has_tma = linear_module._device_limits(dev)
    for M, N, K in [(16, 64, 4096), (17, 64, 4096), (65, 128, 64), (1024, 3072, 768), (128, 3072, 768)]:
        config = _pick_config(M, N, K, torch.float16, dev)
        fills_sms = device == "cpu" or linear_module._num_tiles(linear_module._PERSISTENT, M, N) >= sm_count
        assert config.persistent == (M > 16 and config.split_k == 1 and has_tma and fills_sms)
    if device == "cpu":  # 4 pretend SMs: one tile splits K, four tiles run persistent
        assert _pick_config(17, 64, 4096, torch.float16, dev).split_k > 1
        assert _pick_config(65, 128, 64, torch.float16, dev).persistent
    # exact fp32 (no tensor cores) keeps the pointer kernel; with TF32 allowed it goes persistent
    assert not _pick_config(1024, 3072, 768, torch.float32, dev).persistent


def test_empty_rows(device):
    x, weight, b, r = _inputs(0, 8, 16, torch.float16, device)
    assert linear_fwd(x, weight, b, "relu", r).shape == (0, 8)
    assert tritonize.ops.linear(x.reshape(0, 0, 16), weight).shape == (0, 0, 8)


# -- the epilogue alone (after a matmul done elsewhere: the cuBLAS route of ops.linear) ---------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias, residual", [(True, True), (False, True), (True, False)])
def test_epilogue_of_a_given_product(activation, bias, residual, dtype, device):
    M, N = 37, 70  # odd: partial blocks on both axes
    x, weight, b, r = _inputs(M, N, 24, dtype, device, bias=bias, residual=residual)
    product = (x.double() @ weight.double().t()).to(dtype)
    out = poisoned((M, N), dtype, device)
    assert linear_epilogue_fwd(product, b, activation, r, out=out) is out
    expected = reference.activation(product.double() + (0 if b is None else b.double()), activation)
    assert_close(out, expected + (0 if r is None else r.double()), dtype)


def test_epilogue_in_place_with_a_strided_residual(device):
    product = torch.randn(33, 20, device=device)
    residual = torch.randn(20, 33, device=device).t()  # column-major
    expected = torch.nn.functional.gelu(product.double()) + residual.double()
    assert linear_epilogue_fwd(product, None, "gelu", residual, out=product) is product
    assert_close(product, expected, torch.float32)


def test_gelu_matches_fp64_erf_to_fp32_precision_over_its_range(device):
    """The kernels' GELU (erfc-based, no libdevice erf) against fp64 exact GELU at 16384 points in [-9, 12]:
    relative error within 1e-5 everywhere, negative tails included (1 + erf never cancels)."""
    x = torch.linspace(-9, 12, 128 * 128, device=device, dtype=torch.float32).reshape(128, 128)
    x64 = x.double()
    exact = torch.where(x64 < 0, 0.5 * x64 * torch.special.erfc(-x64 / 2**0.5),
                        0.5 * x64 * (1 + torch.erf(x64 / 2**0.5)))
    out = poisoned((128, 128), torch.float32, device)
    linear_epilogue_fwd(x, None, "gelu", None, out=out)
    relative = ((out.double() - exact).abs() / exact.abs().clamp_min(1e-300)).max().item()
    assert relative < 1e-5, f"largest relative error {relative:.2e}"


def test_epilogue_rejects_a_strided_product(device):
    with pytest.raises(ValueError, match="contiguous product"):
        linear_epilogue_fwd(torch.randn(8, 6, device=device).t(), None, "relu", None)


# -- public op ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_ops_linear_leading_dims(dtype, device):
    x = torch.randn(2, 3, 5, 48, device=device).to(dtype)
    _, weight, b, _ = _inputs(1, 24, 48, dtype, device)
    residual = torch.randn(2, 3, 5, 24, device=device).to(dtype)
    y = tritonize.ops.linear(x, weight, b, activation="gelu", residual=residual)
    ref = _reference(x.reshape(-1, 48), weight, b, "gelu", residual.reshape(-1, 24)).reshape(2, 3, 5, 24)
    assert_close(y, ref, dtype)
    y1 = tritonize.ops.linear(x[0, 0, 0], weight)
    assert_close(y1, _reference(x[0, 0, :1], weight, None, None, None)[0], dtype)


BAD_INPUTS = {  # name: (error, call given x [4, 16], weight [8, 16], bias [8], residual [4, 8] in fp32)
    "float64": (TypeError, lambda x, w, b, r: tritonize.ops.linear(x.double(), w.double())),
    "int": (TypeError, lambda x, w, b, r: tritonize.ops.linear(x.to(torch.int32), w)),
    "weight_dtype": (TypeError, lambda x, w, b, r: tritonize.ops.linear(x, w.half())),
    "bias_dtype": (TypeError, lambda x, w, b, r: tritonize.ops.linear(x, w, b.half())),
    "weight_3d": (ValueError, lambda x, w, b, r: tritonize.ops.linear(x, w.reshape(8, 16, 1))),
    "mismatched_k": (ValueError, lambda x, w, b, r: tritonize.ops.linear(x[:, :15], w)),
    "bias_length": (ValueError, lambda x, w, b, r: tritonize.ops.linear(x, w, b[:7])),
    "bias_2d": (ValueError, lambda x, w, b, r: tritonize.ops.linear(x, w, b.reshape(8, 1))),
    "residual_shape": (ValueError, lambda x, w, b, r: tritonize.ops.linear(x, w, residual=r[:, :7])),
    "residual_transposed": (ValueError, lambda x, w, b, r: tritonize.ops.linear(x, w, residual=r.t())),
    "activation": (ValueError, lambda x, w, b, r: tritonize.ops.linear(x, w, activation="swish")),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs(case, device):
    error, call = BAD_INPUTS[case]
    with pytest.raises(error):
        call(*_inputs(4, 8, 16, torch.float32, device))


def test_torch_compile_fullgraph(device):
    x, weight, b, r = _inputs(2, 3, 16, torch.float32, device)
    x = x.reshape(2, 1, 16)
    r = torch.randn(2, 1, 3, device=device)

    @torch.compile(backend="eager", fullgraph=True)
    def f(x, weight, b, r):
        return tritonize.ops.linear(x, weight, b, activation="silu", residual=r) * 2

    ref = _reference(x.reshape(2, 16), weight, b, "silu", r.reshape(2, 3)).reshape(2, 1, 3) * 2
    assert_close(f(x, weight, b, r), ref, torch.float32)


def test_opcheck(device):
    x, weight, b, r = _inputs(3, 5, 16, torch.float32, device)
    torch.library.opcheck(torch.ops.tritonize.linear.default, (x, weight, b, "gelu", r))
    torch.library.opcheck(torch.ops.tritonize.linear.default, (x, weight, None, "none", None))


# -- real sizes (CUDA only) -----------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    "M, N, K, dtype, activation",
    [
        (4096, 3072, 768, torch.float16, "gelu"),
        (128, 768, 3072, torch.float16, None),
        (16384, 2304, 768, torch.bfloat16, None),
        (1, 8192, 2048, torch.bfloat16, "silu"),
        (16, 8192, 2048, torch.bfloat16, None),
        (1, 2048, 8192, torch.float16, None),
        (1024, 1024, 1024, torch.float32, "gelu_tanh"),
        (8, 6144, 2048, torch.float32, None),
    ],
)
def test_real_sizes(M, N, K, dtype, activation, device):
    x, weight, b, r = _inputs(M, N, K, dtype, device)
    _check_fwd(x, weight, b, activation, r)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "M, N, K, dtype, activation",
    [
        (128, 3072, 768, torch.float16, "gelu"),
        (1024, 3072, 768, torch.bfloat16, "gelu"),
        (4096, 3072, 768, torch.float16, "gelu"),
        (4096, 768, 3072, torch.float16, None),
        (16384, 2304, 768, torch.float16, None),
        (2048, 2304, 768, torch.float32, "gelu_tanh"),
    ],
)
def test_persistent_real_sizes(M, N, K, dtype, activation, device, launches):
    """BERT-base shapes through the heuristic: the persistent TMA kernel on Hopper (sm_90+)."""
    x, weight, b, r = _inputs(M, N, K, dtype, device)
    config = _pick_config(M, N, K, dtype, torch.device(device))
    _check_fwd(x, weight, b, activation, r)
    expected = "_linear_persistent_kernel" if config.persistent else "_linear_kernel"
    assert launches[0][0] == expected
    fills_sms = linear_module._num_tiles(linear_module._PERSISTENT, M, N) >= torch.cuda.get_device_properties(
        device).multi_processor_count
    if torch.cuda.get_device_capability()[0] >= 9 and fills_sms and dtype != torch.float32:
        assert config.persistent


@pytest.mark.gpu
@pytest.mark.parametrize("M", [8, 2048])
def test_listed_configs_compile(M, device, launches):
    """Every swept config fits the GPU (shared memory, registers); persistent ones launch persistent."""
    x, weight, b, r = _inputs(M, 1024, 2048, torch.float16, device)
    configs = linear_configs(M)
    for config in configs if M > 16 else configs[::4]:
        launches.clear()
        _check_fwd(x, weight, b, "gelu", r, config)
        assert launches[0][0] == ("_linear_persistent_kernel" if config.persistent else "_linear_kernel")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M, N, K, config", [
    (16, 768, 3072, LinearConfig(16, 32, 128, group_m=1, split_k=4)),  # bert-base's shipped configs
    (128, 768, 3072, LinearConfig(64, 64, 64, split_k=4)),
    (500, 768, 3072, LinearConfig(64, 128, 64, split_k=2)),
    (16, 4096, 1024, LinearConfig(16, 128, 128, group_m=1, split_k=2)),
])
def test_layer_norm_in_the_split_k_reduce_real_sizes(M, N, K, config, dtype, device, launches):
    x, weight, b, r = _inputs(M, N, K, dtype, device)
    norm_weight, norm_bias = (torch.randn(N, device=device).to(dtype) for _ in range(2))
    out = poisoned((M, N), dtype, device)
    y = linear_fwd(x, weight, b, None, r, out=out, config=config, layer_norm=(norm_weight, norm_bias, 1e-12))
    assert [name for name, _ in launches] == ["_linear_kernel"]
    assert_close(y, _layer_norm_reference(x, weight, b, r, norm_weight, norm_bias, 1e-12), dtype)
