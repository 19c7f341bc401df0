"""The decoder-layer GEMV chain (kernels/gemv_chain.py, `ops.decoder_layer_chain`) against fp64 references
of the four ops it replaces: odd sizes, both row counts, biases, NaN-poisoned outputs, the barrier counter
left at 0, bad input. Through the interpreter the grid is one program; on a GPU, the whole grid."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from helpers import assert_close, poisoned, run_python, sm90_ptx

import tritonize.ops
from tritonize.kernels import gemv, gemv_chain, reference
from tritonize.kernels.common import card_name
from tritonize.kernels.gemv import GEMV_MAX_M, GemvConfig
from tritonize.kernels.gemv_chain import ChainWeights, layer_chain_fwd

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _weights(A, D, inter, n_next, dtype, device, *, biases: bool) -> ChainWeights:
    def matrix(rows, cols):
        return (torch.randn(rows, cols, device=device) / cols**0.5).to(dtype)

    def vector(n, offset=0.0):
        return (torch.randn(n, device=device) * 0.2 + offset).to(dtype) if biases or offset else None

    return ChainWeights(
        o_weight=matrix(D, A), o_bias=vector(D), mlp_norm_weight=vector(D, 1.0), mlp_eps=1e-6,
        gate_up_weight=matrix(2 * inter, D), gate_up_bias=vector(2 * inter), down_weight=matrix(D, inter),
        down_bias=vector(D), next_norm_weight=vector(D, 1.0), next_eps=1e-5, next_weight=matrix(n_next, D),
        next_bias=vector(n_next),
    )  # fmt: skip


def _double(t):
    return None if t is None else t.double()


def _chain_op(attn, h, w: ChainWeights, activation, counter):
    """`tritonize.ops.decoder_layer_chain` on w's weights."""
    return tritonize.ops.decoder_layer_chain(
        attn, h, o_weight=w.o_weight, o_bias=w.o_bias, mlp_norm_weight=w.mlp_norm_weight, mlp_eps=w.mlp_eps,
        gate_up_weight=w.gate_up_weight, gate_up_bias=w.gate_up_bias, down_weight=w.down_weight,
        down_bias=w.down_bias, next_norm_weight=w.next_norm_weight, next_eps=w.next_eps,
        next_weight=w.next_weight, next_bias=w.next_bias, activation=activation, counter=counter,
    )  # fmt: skip


def _reference(attn, h, w: ChainWeights, activation, dtype):
    """The four ops in fp64, each output rounded to dtype as the kernels store it."""
    h_mid = reference.linear(attn.double(), w.o_weight.double(), _double(w.o_bias), None, h.double()).to(dtype)
    normed = reference.rms_norm(h_mid, w.mlp_norm_weight, w.mlp_eps)[0].double()
    act = reference.gated_mlp(normed, w.gate_up_weight.double(), _double(w.gate_up_bias), activation).to(dtype)
    h_out = reference.linear(act.double(), w.down_weight.double(), _double(w.down_bias), None, h_mid.double())
    h_out = h_out.to(dtype)
    normed = reference.rms_norm(h_out, w.next_norm_weight, w.next_eps)[0].double()
    return h_out.double(), reference.linear(normed, w.next_weight.double(), _double(w.next_bias), None, None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", list(range(1, GEMV_MAX_M + 1)))
@pytest.mark.parametrize("biases", [False, True])
@pytest.mark.parametrize("stream", [False, True])
def test_chain_matches_the_four_ops(M, dtype, biases, stream, device):
    """Odd sizes everywhere (every phase's N past a whole block, K with a ragged tail); with stream, each
    program's reads run on into its next row block (K spans 2 to 6 tiles of 16)."""
    A, D, inter, n_next = 44, 70, 90, 37
    w = _weights(A, D, inter, n_next, dtype, device, biases=biases)
    attn = torch.randn(M, A, device=device).to(dtype)
    h = (torch.randn(M, D, device=device) * 3 + 1).to(dtype)  # far from unit RMS: a missing norm shows
    counter = torch.zeros(1, dtype=torch.int32, device=device)
    out = (poisoned((M, D), dtype, device), poisoned((M, n_next), dtype, device))
    h_out, nxt = layer_chain_fwd(attn, h, w, "silu", counter, out=out, stream=stream,
                                 config=GemvConfig(block_n=8, block_k=16) if stream else None)
    assert h_out is out[0] and nxt is out[1]
    ref_h, ref_next = _reference(attn, h, w, "silu", dtype)
    assert_close(h_out, ref_h, dtype)
    assert_close(nxt, ref_next, dtype, scale=2.0)
    assert counter.item() == 0, "the kernel must leave its barrier counter at 0 for the next launch"


def test_op_runs_the_four_ops_elsewhere(device):
    """ops.decoder_layer_chain above GEMV_MAX_M rows (the kernel does not apply) equals the chain of ops."""
    M, dtype = GEMV_MAX_M + 3, torch.float32
    w = _weights(32, 48, 64, 40, dtype, device, biases=True)
    attn, h = torch.randn(M, 32, device=device), torch.randn(M, 48, device=device)
    counter = torch.zeros(1, dtype=torch.int32, device=device)
    h_out, nxt = _chain_op(attn, h, w, "gelu_tanh", counter)
    ref_h, ref_next = _reference(attn, h, w, "gelu_tanh", dtype)
    assert_close(h_out, ref_h, dtype)
    assert_close(nxt, ref_next, dtype)


def test_bad_input_is_named(device):
    dtype = torch.float32
    w = _weights(32, 48, 64, 40, dtype, device, biases=False)
    attn, h = torch.randn(1, 32, device=device), torch.randn(1, 48, device=device)
    counter = torch.zeros(1, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="down_weight has shape"):
        layer_chain_fwd(attn, h, ChainWeights(**{**vars(w), "down_weight": w.down_weight[:, :-1]}), "silu", counter)
    with pytest.raises(ValueError, match="counter must be one int32"):
        layer_chain_fwd(attn, h, w, "silu", counter.long())
    with pytest.raises(ValueError, match="stream needs every K above block_k"):
        layer_chain_fwd(attn, h, w, "silu", counter, stream=True, config=GemvConfig(block_n=4, block_k=32))
    with pytest.raises(ValueError, match="at most"):
        layer_chain_fwd(torch.randn(GEMV_MAX_M + 1, 32, device=device), torch.randn(GEMV_MAX_M + 1, 48,
                        device=device), w, "silu", counter)  # fmt: skip
    with pytest.raises(ValueError, match="counter must be one int32"):
        _chain_op(attn, h, w, "silu", torch.zeros(2, dtype=torch.int32, device=device))


def _four_ops(attn, h, w: ChainWeights, activation):
    """The ops the chain replaces, as the unchained decode step runs them."""
    ops = tritonize.ops
    h_mid = ops.linear(attn, w.o_weight, w.o_bias, residual=h)
    act = ops.rms_norm_gated_mlp(h_mid, w.mlp_norm_weight, w.gate_up_weight, eps=w.mlp_eps, activation=activation,
                                 bias=w.gate_up_bias)
    h_out = ops.linear(act, w.down_weight, w.down_bias, residual=h_mid)
    return h_out, ops.rms_norm_linear(h_out, w.next_norm_weight, w.next_weight, w.next_bias, eps=w.next_eps)


@pytest.mark.gpu
@pytest.mark.parametrize("M", list(range(1, GEMV_MAX_M + 1)))
@pytest.mark.parametrize("stream", [False, True])
def test_llama_layer_shapes_gpu(M, stream):
    """The 1.7 GB Llama's layer (hidden 2048, intermediate 5632, QKV 3072) in bf16 on the whole grid (every
    program resident, the barriers really waiting): the four ops' results, twice on one counter."""
    dtype = torch.bfloat16
    w = _weights(2048, 2048, 5632, 3072, dtype, "cuda", biases=False)
    attn, h = torch.randn(M, 2048, device="cuda").to(dtype), torch.randn(M, 2048, device="cuda").to(dtype)
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")
    want = _four_ops(attn, h, w, "silu")
    for _ in range(2):
        out = (poisoned((M, 2048), dtype, "cuda"), poisoned((M, 3072), dtype, "cuda"))
        got = layer_chain_fwd(attn, h, w, "silu", counter, out=out, stream=stream)
        for g, r in zip(got, want, strict=True):
            assert_close(g, r.double(), dtype)
        assert counter.item() == 0


@pytest.mark.gpu
def test_chain_replays_in_a_cuda_graph_gpu():
    """Three chained layers captured in one CUDA graph (cooperative launches, PDL) replay to the eager result,
    the counter back at 0 after each replay."""
    dtype = torch.bfloat16
    layers = [_weights(2048, 2048, 5632, 2048, dtype, "cuda", biases=True) for _ in range(3)]
    attn, h = torch.randn(1, 2048, device="cuda").to(dtype), torch.randn(1, 2048, device="cuda").to(dtype)
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")

    def run():
        x = h
        for w in layers:
            x, _ = layer_chain_fwd(attn, x, w, "silu", counter)
        return x

    want = run().clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = run()
    for _ in range(3):
        got.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(got, want)
        assert counter.item() == 0


def test_upper_bound_benchmark_kernel_on_cpu():
    """benchmarks/gemv_chain.py's one-launch chain of plain GEMVs checks itself through the interpreter."""
    script = Path(__file__).parents[1] / "benchmarks" / "gemv_chain.py"
    done = run_python(str(script), "--check-cpu", interpret=True)
    assert done.returncode == 0 and "interpreter check passed" in done.stdout, done.stderr


def test_grid_barriers_in_the_compiled_kernel():
    """The chain compiled for sm_90 (no GPU needed): three barriers, each a CTA barrier then a release add with
    no load before it in its basic block (the release waits for the counting thread's loads in flight), then
    the next phase's first weight tiles loaded, then the acquire polls; the counter reset after the third."""
    pointers = [name for name in gemv_chain._layer_chain_kernel.arg_names if name.endswith("_ptr")]
    types = {**dict.fromkeys(pointers, "*bf16"), "Counter_ptr": "*i32", "eps_mlp": "fp32", "eps_next": "fp32"}
    constexprs = dict(HAS_BIAS_O=False, HAS_BIAS_UP=False, HAS_BIAS_DOWN=False, HAS_BIAS_NEXT=False,
                      ACTIVATION="silu", BLOCK_M=1, BLOCK_N=4, BLOCK_K=1024, PDL=True, STREAM=True)
    ptx = sm90_ptx("tritonize.kernels.gemv_chain", "_layer_chain_kernel", types, constexprs)
    body = ptx[ptx.index(".entry"):]
    releases = [match.start() for match in re.finditer(r"atom\.global\.gpu\.release\.add", body)]
    assert len(releases) == 3
    for release in releases:
        before_in_its_block = body[body.rindex("$L__BB", 0, release):release]
        assert "bar.sync" in before_in_its_block and "ld.global" not in before_in_its_block
        poll = body.index("ld.global.gpu.acquire", release)
        assert re.search(r"ld\.global\.(?!gpu\.acquire)", body[release:poll])  # the tiles, in flight while waiting
    assert re.search(r"atom\.global\.gpu\.relaxed\.exch", body[releases[-1]:])


def test_op_leaves_a_weight_too_large_for_the_gemv_to_the_four_ops(device, monkeypatch):
    """Where the card sends a weight of the layer to the tensor-core path (gemv.MAX_WEIGHT_BYTES, as an H200
    does an lm_head), the chain is not used: the four ops run, with their results."""
    dtype = torch.float32
    w = _weights(32, 48, 64, 40, dtype, device, biases=False)
    attn, h = torch.randn(1, 32, device=device), torch.randn(1, 48, device=device)
    monkeypatch.setitem(gemv.MAX_WEIGHT_BYTES, card_name(attn.device), w.next_weight.numel() * 4 - 1)

    def chain_kernel(*args, **kwargs):
        raise AssertionError("the chain kernel ran although the lm_head-sized weight is not the GEMV's")

    monkeypatch.setattr(gemv_chain, "layer_chain_fwd", chain_kernel)
    h_out, nxt = _chain_op(attn, h, w, "silu", torch.zeros(1, dtype=torch.int32, device=device))
    ref_h, ref_next = _reference(attn, h, w, "silu", dtype)
    assert_close(h_out, ref_h, dtype)
    assert_close(nxt, ref_next, dtype)


def test_op_runs_the_four_ops_where_the_gpu_refuses_the_cooperative_launch(device, monkeypatch, caplog):
    """A launch the driver refuses (Triton: "Triton Error [CUDA]: ...", e.g. a grid that cannot be resident at
    once) is reported once and the four ops run, then and on later calls; any other error propagates."""
    dtype = torch.float32
    w = _weights(32, 48, 64, 40, dtype, device, biases=False)
    attn, h = torch.randn(1, 32, device=device), torch.randn(1, 48, device=device)
    monkeypatch.setattr(tritonize.ops, "_CHAIN_LAUNCH_REFUSED", set())
    refusals = []

    def refused(*args, **kwargs):
        refusals.append(1)
        raise RuntimeError("Triton Error [CUDA]: too many blocks in cooperative launch")

    def chain():
        return _chain_op(attn, h, w, "silu", torch.zeros(1, dtype=torch.int32, device=device))

    monkeypatch.setattr(gemv_chain, "layer_chain_fwd", refused)
    ref_h, ref_next = _reference(attn, h, w, "silu", dtype)
    with caplog.at_level("WARNING", logger="tritonize"):
        for _ in range(2):
            h_out, nxt = chain()
            assert_close(h_out, ref_h, dtype)
            assert_close(nxt, ref_next, dtype)
    assert len(refusals) == 1 and "refused the decode layer chain" in caplog.text

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(tritonize.ops, "_CHAIN_LAUNCH_REFUSED", set())
    monkeypatch.setattr(gemv_chain, "layer_chain_fwd", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        chain()
