"""Decode attention vs the fp64 reference: GQA/MQA, lengths, left padding, splits, strides, graphs, bad input."""

import pytest
import torch
from helpers import assert_close, poisoned

import tritonize
from tritonize.kernels import reference
from tritonize.kernels.decode_attention import (
    MIN_SPLIT_KEYS,
    DecodeAttentionConfig,
    decode_attention_fwd,
    default_num_splits,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# small blocks and several splits, so that some splits of the short rows are empty
SPLITS = DecodeAttentionConfig(block_n=32, max_rows=16, num_splits=3, num_warps=4, num_stages=1)


def make_inputs(batch, heads, kv_heads, q_len, max_len, head_dim, dtype, device):
    q = torch.randn(batch, heads, q_len, head_dim, device=device).to(dtype)
    k = torch.randn(batch, kv_heads, max_len, head_dim, device=device).to(dtype)
    v = torch.randn(batch, kv_heads, max_len, head_dim, device=device).to(dtype)
    return q, k, v


def lengths(values, device):
    return torch.tensor(values, dtype=torch.int32, device=device)


def gold(q, k, v, seqlens, scale, key_start=None):
    return reference.decode_attention(q.double(), k.double(), v.double(), seqlens, scale, key_start)


def run_kernel(q, k, v, seqlens, scale, key_start=None, config=None):
    out = poisoned(q.shape, q.dtype, q.device)
    decode_attention_fwd(q, k, v, seqlens, scale, key_start, out=out, config=config)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "batch, heads, kv_heads, q_len, max_len, head_dim, seqlens",
    [
        (3, 8, 2, 1, 130, 64, [130, 1, 57]),  # GQA, one query, full and one-token caches
        (2, 4, 1, 3, 100, 80, [2, 100]),  # MQA; seqlen < q_len: the first query row sees no key
        (2, 2, 2, 16, 70, 128, [16, 70]),  # MHA, 16 queries, a cache holding only the new tokens
    ],
)
def test_matches_reference_with_splits(batch, heads, kv_heads, q_len, max_len, head_dim, seqlens, dtype, device):
    q, k, v = make_inputs(batch, heads, kv_heads, q_len, max_len, head_dim, dtype, device)
    seqlens = lengths(seqlens, device)
    out = run_kernel(q, k, v, seqlens, head_dim**-0.5, config=SPLITS)
    assert_close(out, gold(q, k, v, seqlens, head_dim**-0.5), dtype)


@pytest.mark.parametrize("q_len", [1, 5])
def test_default_config_gqa(q_len, device):
    q, k, v = make_inputs(2, 8, 2, q_len, 200, 64, torch.float16, device)
    seqlens = torch.randint(q_len, 201, (2,), dtype=torch.int32, device=device)
    out = run_kernel(q, k, v, seqlens, 0.2)
    assert_close(out, gold(q, k, v, seqlens, 0.2), torch.float16)


@pytest.mark.parametrize("config", [None, SPLITS])
def test_left_padding_with_an_empty_row(config, device):
    q, k, v = make_inputs(3, 4, 2, 2, 90, 64, torch.bfloat16, device)
    seqlens = lengths([90, 30, 41], device)
    key_start = lengths([7, 30, 0], device)  # row 1: seqlen == key_start, no valid key
    out = run_kernel(q, k, v, seqlens, 0.125, key_start, config=config)
    assert_close(out, gold(q, k, v, seqlens, 0.125, key_start), torch.bfloat16)
    assert (out[1] == 0).all()


def test_cache_views_of_a_bigger_cache(device):
    batch, kv_heads, max_len, head_dim = 2, 2, 80, 64
    # [batch, max_len, kv_heads, head_dim] storage, a window of positions and every other kv head
    big = torch.randn(2, batch, max_len + 20, 2 * kv_heads, head_dim, device=device, dtype=torch.float16)
    k, v = big[:, :, 10 : 10 + max_len, ::2].permute(0, 1, 3, 2, 4).unbind(0)
    q = torch.randn(batch, 2, 4, head_dim, device=device, dtype=torch.float16).transpose(1, 2)  # q_len 2, 4 heads
    assert not (k.is_contiguous() or q.is_contiguous())
    seqlens = lengths([80, 33], device)
    out = run_kernel(q, k, v, seqlens, 0.125, config=SPLITS)
    assert_close(out, gold(q, k, v, seqlens, 0.125), torch.float16)


def test_lengths_beyond_the_cache_are_clamped(device):
    q, k, v = make_inputs(2, 2, 1, 1, 40, 16, torch.float32, device)
    out = run_kernel(q, k, v, lengths([41, 1000], device), 0.25)
    assert_close(out, gold(q, k, v, lengths([40, 40], device), 0.25), torch.float32)


def test_split_count_depends_only_on_shapes():
    cpu = torch.device("cpu")  # counted as an H100's 132 SMs
    assert default_num_splits(programs=64, max_len=4096, device=cpu) == 5  # batch 8 x 8 kv heads
    assert default_num_splits(programs=512, max_len=4096, device=cpu) == 1  # the grid already fills the card
    assert default_num_splits(programs=1, max_len=100, device=cpu) == 1  # too few keys to cut
    assert default_num_splits(programs=1, max_len=300, device=cpu) == 300 // MIN_SPLIT_KEYS  # splits of >= 64 keys
    assert default_num_splits(programs=1, max_len=1 << 20, device=cpu) == 64  # capped


def test_public_op_defaults_and_compile(device):
    q, k, v = make_inputs(2, 4, 2, 2, 50, 32, torch.float32, device)
    seqlens = lengths([50, 9], device)

    def f(q, k, v, seqlens):
        return tritonize.ops.decode_attention(q, k, v, seqlens) * 2

    compiled = torch.compile(f, backend="eager", fullgraph=True)
    out = compiled(q, k, v, seqlens)
    assert out.is_contiguous()
    assert_close(out, 2 * gold(q, k, v, seqlens, 32**-0.5), torch.float32)


def test_opcheck(device):
    q, k, v = make_inputs(2, 2, 1, 1, 20, 16, torch.float32, device)
    torch.library.opcheck(
        torch.ops.tritonize.decode_attention.default,
        (q, k, v, lengths([20, 5], device), 0.25, lengths([0, 2], device)),
        test_utils=("test_schema", "test_faketensor"),
    )


@pytest.mark.parametrize(
    "change, error, words",
    [
        (lambda a: {**a, "q": a["q"].double()}, TypeError, "q has dtype"),
        (lambda a: {**a, "v_cache": a["v_cache"].half()}, TypeError, "v_cache has dtype"),
        (lambda a: {**a, "cache_seqlens": a["cache_seqlens"].long()}, TypeError, "cache_seqlens must be an int32"),
        (lambda a: {**a, "cache_seqlens": a["cache_seqlens"][:1]}, ValueError, r"cache_seqlens must have shape"),
        (lambda a: {**a, "cache_seqlens": a["cache_seqlens"][None]}, ValueError, "cache_seqlens must have 1 dims"),
        (lambda a: {**a, "key_start": torch.zeros(2, dtype=torch.int64)}, TypeError, "key_start must be an int32"),
        (lambda a: {**a, "key_start": torch.zeros(3, dtype=torch.int32)}, ValueError, "key_start must have shape"),
        (lambda a: {**a, "q": torch.randn(2, 4, 17, 16)}, ValueError, "1 to 16 query tokens"),
        (lambda a: {**a, "q": torch.randn(2, 3, 1, 16)}, ValueError, "must divide heads"),
        (lambda a: {**a, "k_cache": torch.randn(3, 2, 8, 16), "v_cache": torch.randn(3, 2, 8, 16)}, ValueError,
         "batch and head_dim must match"),
        (lambda a: {**a, "v_cache": a["v_cache"][:, :, :5]}, ValueError, "same shape"),
        (lambda a: {**a, "k_cache": a["k_cache"][:, :, :1], "v_cache": a["v_cache"][:, :, :1]}, ValueError,
         "fewer than the q_len"),
        (lambda a: {**a, "scale": 0.0}, ValueError, "scale must be"),
        (lambda a: {**a, "k_cache": [1.0]}, TypeError, "k_cache must be a torch.Tensor"),
        (lambda a: {**a, "key_start": [0, 0]}, TypeError, "key_start must be a torch.Tensor"),
    ],
)
def test_bad_input_is_named(change, error, words):
    args = dict(
        q=torch.randn(2, 4, 2, 16), k_cache=torch.randn(2, 2, 8, 16), v_cache=torch.randn(2, 2, 8, 16),
        cache_seqlens=torch.tensor([8, 3], dtype=torch.int32), key_start=None, scale=None,
    )
    args = change(args)
    with pytest.raises(error, match=words):
        tritonize.ops.decode_attention(args.pop("q"), args.pop("k_cache"), args.pop("v_cache"),
                                       args.pop("cache_seqlens"), **args)


def test_head_dim_out_of_range():
    q = torch.randn(1, 1, 1, 8)
    with pytest.raises(ValueError, match="head_dim must be in"):
        tritonize.ops.decode_attention(q, q, q, torch.ones(1, dtype=torch.int32))


@pytest.mark.gpu
@pytest.mark.parametrize("q_len", [1, 4, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_real_sizes_gpu(q_len, dtype):
    batch, max_len = 8, 4096
    q, k, v = make_inputs(batch, 32, 8, q_len, max_len, 128, dtype, "cuda")
    seqlens = torch.randint(q_len, max_len + 1, (batch,), dtype=torch.int32, device="cuda")
    seqlens[0], seqlens[1] = max_len, q_len
    key_start = torch.randint(0, 64, (batch,), dtype=torch.int32, device="cuda")
    out = run_kernel(q, k, v, seqlens, 128**-0.5, key_start)
    assert_close(out, gold(q, k, v, seqlens, 128**-0.5, key_start), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 80, 256])
def test_real_sizes_fp32_and_head_dims_gpu(head_dim):
    q, k, v = make_inputs(4, 16, 2, 2, 3000, head_dim, torch.float32, "cuda")
    seqlens = torch.randint(2, 3001, (4,), dtype=torch.int32, device="cuda")
    out = run_kernel(q, k, v, seqlens, head_dim**-0.5)
    assert_close(out, gold(q, k, v, seqlens, head_dim**-0.5), torch.float32)


@pytest.mark.gpu
def test_one_cuda_graph_serves_every_length():
    q, k, v = make_inputs(8, 32, 8, 1, 4096, 128, torch.bfloat16, "cuda")
    seqlens = torch.full((8,), 4096, dtype=torch.int32, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        tritonize.ops.decode_attention(q, k, v, seqlens)  # compile before capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tritonize.ops.decode_attention(q, k, v, seqlens)
    for new in ([4096, 1, 2, 17, 1000, 2049, 3333, 64], [5, 4000, 300, 1, 4096, 128, 129, 7]):
        seqlens.copy_(torch.tensor(new, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, gold(q, k, v, seqlens, 128**-0.5), torch.bfloat16)
