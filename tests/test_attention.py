"""Flash attention forward vs the fp64 reference: shapes, masks, bias, GQA, strides, bad input."""

import math

import pytest
import torch
from helpers import assert_close, assert_pdl_waits_first, poisoned, sm90_ptx

import tritonize
from tritonize.kernels import attention as attention_kernel
from tritonize.kernels import reference
from tritonize.kernels.attention import AttentionConfig, flash_attention_fwd

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SMALL_BLOCKS = AttentionConfig(block_m=32, block_n=32, num_warps=4, num_stages=1)


def make_qkv(batch, heads, kv_heads, q_len, kv_len, head_dim, dtype, device):
    q = torch.randn(batch, heads, q_len, head_dim, device=device).to(dtype)
    k = torch.randn(batch, kv_heads, kv_len, head_dim, device=device).to(dtype)
    v = torch.randn(batch, kv_heads, kv_len, head_dim, device=device).to(dtype)
    return q, k, v


def gold(q, k, v, scale, causal=False, key_padding_mask=None, bias=None):
    bias64 = None if bias is None else bias.double()
    return reference.attention(q.double(), k.double(), v.double(), scale, causal, key_padding_mask, bias64)


def run_kernel(q, k, v, scale, causal=False, key_padding_mask=None, bias=None, config=None):
    out = poisoned(q.shape, q.dtype, q.device)
    flash_attention_fwd(q, k, v, scale, causal, key_padding_mask, bias, out=out, config=config)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "batch, heads, kv_heads, q_len, kv_len, head_dim, causal",
    [
        (2, 2, 2, 33, 33, 64, False),
        (1, 2, 2, 65, 100, 80, True),  # causal aligned to the end, several blocks, ragged tail
        (2, 4, 1, 33, 70, 48, False),  # MQA
        (1, 4, 2, 100, 70, 32, True),  # q_len > kv_len: the first rows see no key
        (1, 1, 1, 1, 257, 16, True),  # one decode query
    ],
)
def test_matches_reference_small_blocks(batch, heads, kv_heads, q_len, kv_len, head_dim, causal, dtype, device):
    q, k, v = make_qkv(batch, heads, kv_heads, q_len, kv_len, head_dim, dtype, device)
    scale = 1.0 / math.sqrt(head_dim)
    out = run_kernel(q, k, v, scale, causal, config=SMALL_BLOCKS)
    assert_close(out, gold(q, k, v, scale, causal), dtype)


@pytest.mark.parametrize("head_dim", [16, 40, 64, 96, 128, 256])
def test_head_dims_default_blocks(head_dim, device):
    q, k, v = make_qkv(1, 2, 1, 17, 33, head_dim, torch.float16, device)
    out = run_kernel(q, k, v, 0.3, causal=False)
    assert_close(out, gold(q, k, v, 0.3), torch.float16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_key_padding_mask_with_empty_rows(dtype, causal, device):
    batch, kv_len = 3, 100
    q, k, v = make_qkv(batch, 2, 2, 100, kv_len, 32, dtype, device)
    mask = torch.rand(batch, kv_len, device=device) > 0.4
    mask[1] = False  # every key masked: zeros, never NaN
    mask[2, :70] = False  # left padding: whole key blocks skipped
    out = run_kernel(q, k, v, 0.2, causal, key_padding_mask=mask, config=SMALL_BLOCKS)
    assert_close(out, gold(q, k, v, 0.2, causal, key_padding_mask=mask), dtype)
    assert (out[1] == 0).all()


@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.int32, torch.uint8])
def test_integer_key_padding_mask_attends_where_nonzero(mask_dtype, device):
    """An integer mask (HF's attention_mask as the user passes it) attends where it is nonzero, any value."""
    q, k, v = make_qkv(2, 2, 1, 9, 41, 32, torch.float32, device)
    mask = torch.randint(0, 3, (2, 41), device=device).to(mask_dtype)  # 0, 1 and 2
    mask[1, 30:] = 0
    out = tritonize.ops.attention(q, k, v, scale=0.3, key_padding_mask=mask)
    assert_close(out, gold(q, k, v, 0.3, key_padding_mask=mask != 0), torch.float32)
    out = run_kernel(q, k, v, 0.3, key_padding_mask=mask, config=SMALL_BLOCKS)
    assert_close(out, gold(q, k, v, 0.3, key_padding_mask=mask != 0), torch.float32)


@pytest.mark.parametrize(
    "bias_shape",
    [(2, 3, 33, 65), (1, 3, 33, 65), (2, 1, 1, 65), (33, 65)],  # full, T5 position bias, ALiBi-like, 2-D
)
def test_bias_broadcasts(bias_shape, device):
    q, k, v = make_qkv(2, 3, 3, 33, 65, 32, torch.float32, device)
    bias = torch.randn(bias_shape, device=device)
    out = run_kernel(q, k, v, 1.0, bias=bias, config=SMALL_BLOCKS)
    assert_close(out, gold(q, k, v, 1.0, bias=bias), torch.float32)


def test_bias_with_minus_infinity_and_mask(device):
    q, k, v = make_qkv(2, 2, 2, 40, 40, 32, torch.float16, device)
    bias = torch.randn(2, 2, 40, 40, device=device)
    bias[:, :, 5] = float("-inf")  # one query row fully blocked by the bias
    bias[:, :, :, :7] = float("-inf")
    mask = torch.rand(2, 40, device=device) > 0.2
    out = run_kernel(q, k, v, 0.5, True, key_padding_mask=mask, bias=bias, config=SMALL_BLOCKS)
    assert_close(out, gold(q, k, v, 0.5, True, key_padding_mask=mask, bias=bias), torch.float16)
    assert (out[:, :, 5] == 0).all()


def test_any_strides_from_packed_qkv(device):
    batch, seqlen, heads, head_dim = 2, 45, 3, 32
    qkv = torch.randn(batch, seqlen, 3, heads, head_dim, device=device, dtype=torch.float16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [batch, heads, seqlen, head_dim] views, not contiguous
    assert not q.is_contiguous()
    out = tritonize.ops.attention(q, k, v, causal=True)
    assert_close(out, gold(q, k, v, head_dim**-0.5, True), torch.float16)
    assert out.is_contiguous()


def test_public_op_defaults_and_compile(device):
    q, k, v = make_qkv(1, 2, 1, 20, 20, 64, torch.float32, device)
    mask = torch.ones(1, 20, dtype=torch.bool, device=device)
    mask[0, -3:] = False

    def f(q, k, v, mask):
        return tritonize.ops.attention(q, k, v, key_padding_mask=mask) * 2

    compiled = torch.compile(f, backend="eager", fullgraph=True)
    assert_close(compiled(q, k, v, mask), 2 * gold(q, k, v, 0.125, key_padding_mask=mask), torch.float32)


def test_opcheck(device):
    q, k, v = make_qkv(1, 2, 1, 16, 16, 16, torch.float32, device)
    mask = torch.rand(1, 16, device=device) > 0.5
    torch.library.opcheck(
        torch.ops.tritonize.attention.default,
        (q, k, v, 0.25, True, mask, None, False),
        test_utils=("test_schema", "test_faketensor"),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_seq_major_output_and_mask_scanned_in_several_steps(dtype, device, monkeypatch):
    """seq_major=True writes [batch, q_len, heads, head_dim]; the kernel finds each row's attended key
    range in KEY_SCAN_BLOCK steps (2 steps of 16 here), with holes inside the range."""
    monkeypatch.setattr(attention_kernel, "KEY_SCAN_BLOCK", 16)
    q, k, v = make_qkv(3, 2, 1, 9, 27, 32, dtype, device)
    mask = torch.rand(3, 27, device=device) > 0.3
    mask[0, :20] = False  # attended keys only in the second scan step
    mask[1, 5:] = False  # only in the first
    scale = 0.2
    out = tritonize.ops.attention(q, k, v, scale=scale, key_padding_mask=mask, seq_major=True)
    assert out.shape == (3, 9, 2, 32) and out.is_contiguous()
    expected = gold(q, k, v, scale, key_padding_mask=mask).transpose(1, 2)
    assert_close(out, expected, dtype)
    with pytest.raises(TypeError, match="seq_major"):
        tritonize.ops.attention(q, k, v, seq_major=1)


def test_zero_length_keys_give_zeros(device):
    q, k, v = make_qkv(1, 1, 1, 5, 0, 16, torch.float32, device)
    out = tritonize.ops.attention(q, k, v)
    assert out.shape == q.shape and (out == 0).all()


@pytest.mark.parametrize(
    "change, error, words",
    [
        (lambda a: {**a, "q": a["q"].double()}, TypeError, "q has dtype"),
        (lambda a: {**a, "k": a["k"].half()}, TypeError, "k has dtype"),
        (lambda a: {**a, "q": a["q"][0]}, ValueError, "q must have 4 dims"),
        (lambda a: {**a, "k": a["k"][:, :, :, :8], "v": a["v"][:, :, :, :8]}, ValueError, "head_dim must match"),
        (lambda a: {**a, "q": torch.randn(2, 3, 6, 16)}, ValueError, "must divide heads"),
        (lambda a: {**a, "v": a["v"][:, :, :5]}, ValueError, "same shape"),
        (lambda a: {**a, "key_padding_mask": torch.ones(2, 9)}, TypeError, "key_padding_mask must be bool or integer"),
        (lambda a: {**a, "key_padding_mask": torch.ones(2, 9, dtype=torch.bool)}, ValueError, "key_padding_mask"),
        (lambda a: {**a, "bias": torch.zeros(3, 1, 1, 1)}, ValueError, "bias of shape"),
        (lambda a: {**a, "scale": float("nan")}, ValueError, "scale"),
        (lambda a: {**a, "scale": -0.5}, ValueError, "scale must be"),
    ],
)
def test_bad_input_is_named(change, error, words):
    args = dict(
        q=torch.randn(2, 4, 6, 16), k=torch.randn(2, 2, 8, 16), v=torch.randn(2, 2, 8, 16),
        key_padding_mask=None, bias=None, scale=None,
    )
    args = change(args)
    with pytest.raises(error, match=words):
        tritonize.ops.attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def test_head_dim_out_of_range():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="head_dim must be in"):
        tritonize.ops.attention(q, q, q)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 80, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_real_sizes_gpu(dtype, head_dim, causal):
    q, k, v = make_qkv(4, 8, 2, 1000, 1000, head_dim, dtype, "cuda")
    mask = torch.rand(4, 1000, device="cuda") > 0.1
    out = run_kernel(q, k, v, head_dim**-0.5, causal, key_padding_mask=mask)
    assert_close(out, gold(q, k, v, head_dim**-0.5, causal, key_padding_mask=mask), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 96, 128, 256])
def test_real_sizes_fp32_and_bias_gpu(head_dim):
    q, k, v = make_qkv(2, 12, 12, 512, 512, head_dim, torch.float32, "cuda")
    bias = torch.randn(1, 12, 512, 512, device="cuda")
    out = run_kernel(q, k, v, 0.125, causal=True, bias=bias)
    assert_close(out, gold(q, k, v, 0.125, causal=True, bias=bias), torch.float32)


def test_pdl_waits_before_the_first_load():
    """Compiled for sm_90 (no GPU needed, no interpreter), the kernel with PDL waits for the previous kernel
    before it reads any input and then lets the next one launch: a load above the wait would race with the
    kernel that writes q, k, v."""
    types = {name: "*fp16" for name in ("Q_ptr", "K_ptr", "V_ptr", "Out_ptr", "Bias_ptr")}
    types.update(Kpm_ptr="*u8", scale_log2="fp32")
    constexprs = dict(HEAD_DIM=64, BLOCK_D=64, BLOCK_M=64, BLOCK_N=64, CAUSAL=False, HAS_BIAS=True, HAS_KPM=True,
                      SCAN_BLOCK=256, INPUT_PRECISION="tf32", PDL=True)
    assert_pdl_waits_first(sm90_ptx("tritonize.kernels.attention", "_attention_fwd_kernel", types, constexprs))
