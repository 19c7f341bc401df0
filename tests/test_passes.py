"""fx passes through the Dynamo backend: modules built from transformer blocks, compiled with
`tritonize_backend`, must match eager, count the expected replacements and report every fallback."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from torch import nn

import tritonize
from tritonize.passes import DEFAULT_REGISTRY, Registry, fake, register_pattern
from tritonize.passes.linear import linear_plain
from tritonize.passes.registry import Reject, replace
from tritonize.reporting import Report
from tritonize.runtime import tritonize_backend
from tritonize.runtime.backend import GRAD_NOTE

PATTERNS_DOC = Path(__file__).resolve().parents[1] / "docs" / "patterns.md"


def _compile(module, *inputs, context=torch.inference_mode, **backend_options):
    """(compiled output, eager output, report, the rewritten graphs) for module(*inputs)."""
    report, graphs = Report(), []
    backend = tritonize_backend(report, **backend_options)

    def capture(gm, example_inputs):
        graphs.append(gm)
        return backend(gm, example_inputs)

    torch._dynamo.reset()
    with context():
        expected = module(*inputs)
        out = torch.compile(module, backend=capture)(*inputs)
    return out, expected, report, graphs


def _ops_calls(graphs) -> list[tuple[str, dict]]:
    """(op name, keyword arguments) of every tritonize.ops call in the graphs."""
    return [
        (n.target.__name__, dict(n.kwargs))
        for gm in graphs
        for n in gm.graph.nodes
        if n.op == "call_function" and getattr(n.target, "__module__", "") == "tritonize.ops"
    ]


def _reasons(report: Report) -> str:
    return " | ".join(f"{node}: {reason}" for node, reason in report.fallbacks)


# -- linear + activation + residual ---------------------------------------------------------------


class MLP(nn.Module):
    """x + dropout(fc2(dropout(act(fc1(x))))), as BERT / ViT blocks write it."""

    def __init__(self, act: nn.Module, dim: int = 32, hidden: int = 48) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), act, nn.Linear(hidden, dim)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        return x + self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


@pytest.mark.parametrize(
    "act, name",
    [(nn.GELU(), "gelu"), (nn.GELU(approximate="tanh"), "gelu_tanh"), (nn.ReLU(), "relu"), (nn.SiLU(), "silu"),
     (nn.Tanh(), "tanh"), (nn.Identity(), None)],
)
def test_mlp_fuses_activation_and_residual(act, name, device):
    model = MLP(act).to(device).eval()
    x = torch.randn(2, 7, 32, device=device)
    out, expected, report, graphs = _compile(model, x)
    assert_close(out, expected)
    assert report.replaced == {"linear": 2} and not report.fallbacks
    calls = _ops_calls(graphs)
    assert [c[1].get("activation") for c in calls] == [name, None]
    assert calls[0][1].get("residual") is None and calls[1][1]["residual"] is not None


@pytest.mark.parametrize("context", [torch.inference_mode, torch.no_grad])
def test_inplace_residual_and_contexts(context, device):
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(32, 32)

        def forward(self, x):
            h = self.fc(x)
            h += x
            return h

    x = torch.randn(3, 32, device=device)
    out, expected, report, graphs = _compile(Block().to(device).eval(), x, context=context)
    assert_close(out, expected)
    assert report.replaced == {"linear": 1}
    assert _ops_calls(graphs)[0][1]["residual"] is not None


def test_skip_plain_linear_and_unknown_names(device):
    x = torch.randn(2, 5, 32, device=device)
    out, expected, report, graphs = _compile(MLP(nn.Identity()).to(device).eval(), x, skip={"linear_plain"})
    assert_close(out, expected)
    assert report.replaced == {"linear": 1}  # only fc2, which has a residual to fuse
    with pytest.raises(ValueError, match="unknown patterns"):
        tritonize_backend(Report(), skip={"no_such_pattern"})
    with pytest.raises(ValueError, match="stage"):
        register_pattern("linear", stage="late")


def test_fallbacks_keep_pytorch_and_say_why(device):
    model = MLP(nn.GELU()).to(device).double().eval()
    x = torch.randn(2, 5, 32, device=device, dtype=torch.float64)
    out, expected, report, _ = _compile(model, x)
    assert torch.equal(out, expected)
    assert not report.replaced
    assert "fc1" in _reasons(report) and "dtype torch.float64" in _reasons(report)

    model = MLP(nn.GELU()).to(device).train()
    _, _, report, _ = _compile(model, x.float(), context=torch.no_grad)
    assert "dropout is active" in _reasons(report)


def test_graph_needing_gradients_is_left_alone(device):
    model = MLP(nn.GELU()).to(device).eval()
    x = torch.randn(2, 5, 32, device=device)
    out, expected, report, _ = _compile(model, x, context=torch.enable_grad)
    assert_close(out, expected)
    assert not report.replaced and report.notes == [GRAD_NOTE]


# -- LayerNorm / RMSNorm --------------------------------------------------------------------------


class PostNorm(nn.Module):
    """LayerNorm(x + f(x)): the sum feeds only the norm."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(32, eps=1e-6)

    def forward(self, x, r):
        return self.norm(r + torch.tanh(x))


class PreNorm(PostNorm):
    """h = x + f(x) feeds the norm and the rest of the block."""

    def forward(self, x, r):
        h = r + torch.tanh(x)
        return self.norm(h), h * 2


class LlamaRMSNorm(nn.Module):
    """As HF writes LlamaRMSNorm (and Mistral, Qwen2, ...)."""

    def __init__(self, hidden_size: int = 32, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class GemmaRMSNorm(LlamaRMSNorm):
    """As HF writes GemmaRMSNorm: multiply by (1 + weight) in fp32, then round."""

    def forward(self, x):
        output = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        output = output * (1.0 + self.weight.float())
        return output.type_as(x)


class T5LayerNorm(LlamaRMSNorm):
    """As HF writes T5LayerNorm: statistics of the fp32 cast, applied to x itself."""

    def forward(self, hidden_states):
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states


class ResidualRMSNorm(LlamaRMSNorm):
    def forward(self, x, r):
        h = x + r
        return super().forward(h), h


@pytest.mark.parametrize(
    "model, kind, kwargs",
    [(PostNorm(), "layer_norm", {"residual"}), (PreNorm(), "layer_norm", {"residual"}),
     (LlamaRMSNorm(), "rms_norm", {"variant"}), (GemmaRMSNorm(), "rms_norm", {"variant"}),
     (T5LayerNorm(), "rms_norm", {"variant"}), (ResidualRMSNorm(), "rms_norm", {"variant", "residual"})],
    ids=["post_norm", "pre_norm", "llama", "gemma", "t5", "llama_residual"],
)
def test_norms(model, kind, kwargs, device):
    x, r = torch.randn(2, 7, 32, device=device), torch.randn(2, 7, 32, device=device)
    args = (x, r) if isinstance(model, (PostNorm, ResidualRMSNorm)) else (x,)
    out, expected, report, graphs = _compile(model.to(device), *args)
    for o, e in zip(*((out, expected) if isinstance(out, tuple) else ((out,), (expected,))), strict=True):
        assert_close(o, e)
    assert report.replaced == {kind: 1} and not report.fallbacks
    ((_, call_kwargs),) = _ops_calls(graphs)
    assert set(call_kwargs) == kwargs
    if kind == "rms_norm":
        assert call_kwargs["variant"] == ("gemma" if isinstance(model, GemmaRMSNorm) else "llama")


class DenseAddNorm(nn.Module):
    """BERT's output block: LayerNorm(dense(x) + r), optionally with an activation or a second reader."""

    def __init__(self, activation: bool = False, pre_norm: bool = False) -> None:
        super().__init__()
        self.dense, self.norm = nn.Linear(24, 32), nn.LayerNorm(32, eps=1e-6)
        self.activation, self.pre_norm = activation, pre_norm

    def forward(self, x, r):
        y = self.dense(x)
        h = (torch.relu(y) if self.activation else y) + r
        return (self.norm(h), h * 2) if self.pre_norm else self.norm(h)


class SummedEmbeddings(nn.Module):
    """BERT's embeddings: LayerNorm(words[ids] + types[type_ids] + positions[arange(seq)]) (positions broadcast
    over the batch); max_norm on the words makes the lookup renormalize its table."""

    def __init__(self, tables: int = 3, max_norm: float | None = None) -> None:
        super().__init__()
        self.words = nn.Embedding(30, 16, max_norm=max_norm)
        self.others = nn.ModuleList(nn.Embedding(rows, 16) for rows in (2, 12, 12)[:tables - 1])
        self.norm = nn.LayerNorm(16, eps=1e-12)

    def forward(self, ids, type_ids):
        total = self.words(ids)
        for i, table in enumerate(self.others):
            total = total + (table(type_ids) if i == 0 else table(torch.arange(ids.shape[1], device=ids.device)[None]))
        return self.norm(total)


@pytest.mark.parametrize("tables, max_norm, fused", [(2, None, True), (3, None, True), (4, None, False),
                                                     (3, 1.0, False)])
def test_embedding_sums_join_their_layer_norm(tables, max_norm, fused, device):
    """2 or 3 lookups summed into a LayerNorm -> one ops.embedding_layer_norm; 4 lookups (rejected, with the
    reason) or a renormalizing lookup leave the lookups alone and the norm to `layer_norm`."""
    model = SummedEmbeddings(tables, max_norm).to(device).eval()
    ids, type_ids = torch.randint(0, 30, (2, 9), device=device), torch.randint(0, 2, (2, 9), device=device)
    with torch.no_grad():
        out, expected, report, graphs = _compile(model, ids, type_ids, context=torch.no_grad)
    assert_close(out, expected)
    names = [name for name, _ in _ops_calls(graphs)]
    assert names == (["embedding_layer_norm"] if fused else ["layer_norm"])
    rejected = [reason for _, reason in report.fallbacks]
    assert rejected == (["4 embeddings are summed; the kernel takes 2 or 3 [embedding_layer_norm]"] if tables == 4
                        else [])


class BufferedTokenTypes(nn.Module):
    """HF BERT's embeddings without token_type_ids: the types are a [1, max_len] buffer read through the position
    ids with torch.gather, then expanded over the batch."""

    def __init__(self, words_looked_up: bool = True) -> None:
        super().__init__()
        self.words_looked_up = words_looked_up
        self.words, self.types, self.positions = nn.Embedding(30, 16), nn.Embedding(3, 16), nn.Embedding(20, 16)
        self.norm = nn.LayerNorm(16, eps=1e-12)
        self.register_buffer("position_ids", torch.arange(20)[None], persistent=False)
        self.register_buffer("token_type_ids", torch.randint(0, 3, (1, 20)), persistent=False)  # not all zeros

    def forward(self, ids):
        batch, seq = ids.shape
        position_ids = self.position_ids[:, 2:seq + 2]
        def gathered_types(index):
            return torch.gather(self.token_type_ids.expand(index.shape[0], -1), dim=1, index=index).expand(batch, seq)

        if self.words_looked_up:
            total = self.words(ids) + self.types(gathered_types(position_ids))
        else:  # the only ids with the batch dim: two expanded gathers
            total = self.types(gathered_types(position_ids)) + self.types(gathered_types(position_ids.flip(-1)))
        return self.norm(total + self.positions(position_ids))


@pytest.mark.parametrize("words_looked_up, mapped", [(True, [False, True, False]), (False, [True, False, False])])
def test_token_types_gathered_from_a_buffer_are_read_by_the_kernel(words_looked_up, mapped, device):
    """The gather of the token-type buffer through the position ids leaves the graph: ops.embedding_layer_norm
    reads the positions through the buffer (an id map) itself, and the result is eager's. Where no other
    lookup has the batch dim, one lookup keeps its expanded ids, so the output keeps its shape."""
    model = BufferedTokenTypes(words_looked_up).to(device).eval()
    ids = torch.randint(0, 30, (2, 9), device=device)
    out, expected, report, graphs = _compile(model, ids, context=torch.no_grad)
    assert_close(out, expected)
    assert [name for name, _ in _ops_calls(graphs)] == ["embedding_layer_norm"] and not report.fallbacks
    ((_, call_kwargs),) = _ops_calls(graphs)
    assert [m is not None for m in call_kwargs["id_maps"]] == mapped


class CountedPositions(nn.Module):
    """HF RoBERTa's embeddings: positions numbered past the padding (create_position_ids_from_input_ids, with
    `past_length`), the token types read from a buffer through them. `variant` breaks the formula: "other_pad"
    compares with another id than the one added, "batch_dim" counts along the batch; "positions_first" sums the
    position lookup first."""

    def __init__(self, past_length: int = 0, variant: str = "hf") -> None:
        super().__init__()
        self.past_length, self.variant, self.padding_idx = past_length, variant, 1
        self.words, self.types, self.positions = nn.Embedding(30, 16), nn.Embedding(3, 16), nn.Embedding(40, 16)
        self.norm = nn.LayerNorm(16, eps=1e-12)
        self.register_buffer("token_type_ids", torch.randint(0, 3, (1, 40)), persistent=False)

    def forward(self, ids):
        mask = ids.ne(self.padding_idx if self.variant != "other_pad" else 2).int()
        dim = 0 if self.variant == "batch_dim" else 1
        position_ids = ((torch.cumsum(mask, dim=dim).type_as(mask) + self.past_length) * mask).long() + self.padding_idx
        types = torch.gather(self.token_type_ids.expand(ids.shape[0], -1), dim=1, index=position_ids)
        if self.variant == "positions_first":  # the counted lookup before the one read through the buffer
            return self.norm(self.positions(position_ids) + self.words(ids) + self.types(types))
        return self.norm(self.words(ids) + self.types(types) + self.positions(position_ids))


@pytest.mark.parametrize("past_length, variant, counted", [
    (0, "hf", True), (3, "hf", True), (0, "positions_first", True), (0, "other_pad", False), (0, "batch_dim", False),
])
def test_positions_counted_past_padding_are_counted_by_the_kernel(past_length, variant, counted, device):
    """RoBERTa's position ids (ne, int, cumsum, type_as, add, mul, long, add: PyTorch kernels of their own) leave
    the graph: ops.embedding_layer_norm counts them from the token ids, padded rows included; a formula that
    differs stays in the graph, and the result is eager's either way."""
    model = CountedPositions(past_length, variant).to(device).eval()
    ids = torch.randint(0, 30, (3, 9), device=device)
    ids[0, -3:], ids[1, :2], ids[2, 4] = 1, 1, 1  # right, left and inner padding
    out, expected, report, graphs = _compile(model, ids, context=torch.no_grad)
    assert_close(out, expected)
    assert [name for name, _ in _ops_calls(graphs)] == ["embedding_layer_norm"] and not report.fallbacks
    ((_, call_kwargs),) = _ops_calls(graphs)
    assert ("positions_from" in call_kwargs) == counted
    targets = {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op in ("call_function", "call_method")}
    assert any("cumsum" in t for t in targets) != counted
    if counted:
        assert (call_kwargs["padding_idx"], call_kwargs["past_length"]) == (1, past_length)


@pytest.mark.parametrize("activation, pre_norm, joined", [(False, False, True), (True, False, False),
                                                          (False, True, False)])
def test_linear_joins_the_layer_norm_that_alone_reads_it(activation, pre_norm, joined, device):
    model = DenseAddNorm(activation, pre_norm).to(device).eval()
    x, r = torch.randn(2, 7, 24, device=device), torch.randn(2, 7, 32, device=device)
    out, expected, report, graphs = _compile(model, x, r)
    for o, e in zip(*((out, expected) if pre_norm else ((out,), (expected,))), strict=True):
        assert_close(o, e)
    assert report.replaced == {"linear": 1, "layer_norm": 1, **({"linear_layer_norm": 1} if joined else {})}
    names = [name for name, _ in _ops_calls(graphs)]
    assert names == (["linear_layer_norm"] if joined else ["linear", "layer_norm"])


def test_in_place_op_inside_the_region_is_not_moved_across(device):
    class MutatesBeforeTheSum(PostNorm):
        def forward(self, x, r):
            x = x.clone()
            x.add_(r)  # the fused kernel must not read x before this
            h = x + r
            return self.norm(h), h

    x, r = torch.randn(2, 7, 32, device=device), torch.randn(2, 7, 32, device=device)
    out, expected, report, graphs = _compile(MutatesBeforeTheSum().to(device), x, r)
    for o, e in zip(out, expected, strict=True):
        assert_close(o, e)
    assert report.replaced == {"layer_norm": 1}
    assert _ops_calls(graphs)[0][1] == {}  # the norm alone: the add stays where it was


def test_rms_norm_with_unknown_rounding_falls_back(device):
    class WeightBeforeRounding(LlamaRMSNorm):
        def forward(self, x):
            normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return (normed * self.weight.float()).to(x.dtype)

    x = torch.randn(2, 7, 32, device=device, dtype=torch.float16)
    out, expected, report, _ = _compile(WeightBeforeRounding().to(device).half(), x)
    assert torch.equal(out, expected)
    assert not report.replaced and "neither Llama's nor Gemma's" in _reasons(report)


# -- attention ------------------------------------------------------------------------------------


class ExplicitAttention(nn.Module):
    """softmax(q k^T scaled + mask) v written out, as HF's eager attention functions do."""

    def __init__(self, scale: float | None) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, q, k, v, mask=None):
        if self.scale is None:
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
        else:
            scores = torch.matmul(q, k.transpose(2, 3)) * self.scale
        if mask is not None:
            scores = scores + mask
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        probs = F.dropout(probs, p=0.1, training=self.training)
        return torch.matmul(probs, v)


class SdpaAttention(nn.Module):
    def __init__(self, **options) -> None:
        super().__init__()
        self.options = options

    def forward(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **self.options)


def _qkv(device, batch=2, heads=2, kv_heads=2, q_len=7, kv_len=9, head_dim=16):
    q = torch.randn(batch, heads, q_len, head_dim, device=device)
    k = torch.randn(batch, kv_heads, kv_len, head_dim, device=device)
    return q, k, torch.randn_like(k)


def _padding(device, batch=2, kv_len=9):
    keep = torch.ones(batch, 1, 1, kv_len, dtype=torch.bool, device=device)
    keep[1, ..., -3:] = False
    return keep


@pytest.mark.parametrize("scale, masked", [(None, True), (0.3, False)])
def test_explicit_attention(scale, masked, device):
    q, k, v = _qkv(device)
    mask = torch.zeros(2, 1, 1, 9, device=device).masked_fill(~_padding(device), -1e9) if masked else None
    out, expected, report, graphs = _compile(ExplicitAttention(scale).eval(), q, k, v, mask)
    assert_close(out, expected)
    assert report.replaced == {"attention": 1} and not report.fallbacks
    ((_, call_kwargs),) = _ops_calls(graphs)
    assert call_kwargs["scale"] == pytest.approx(0.25 if scale is None else scale)
    assert ("bias" in call_kwargs) == masked


@pytest.mark.parametrize("case", ["causal", "padding", "bool_mask", "float_mask", "gqa"])
def test_sdpa(case, device):
    q, k, v = _qkv(device, q_len=9)
    options, mask, mask_kwarg = {}, None, None
    if case == "causal":
        options = {"is_causal": True}
    elif case == "padding":
        mask, mask_kwarg = _padding(device), "key_padding_mask"
    elif case == "bool_mask":
        mask, mask_kwarg = torch.rand(2, 1, 9, 9, device=device) > 0.3, "bias"
        mask[..., 0] = True
    elif case == "float_mask":
        mask, mask_kwarg = torch.randn(1, 2, 9, 9, device=device), "bias"
    else:
        q, k, v = _qkv(device, heads=4, kv_heads=2, q_len=9)
        options = {"enable_gqa": True, "scale": 0.2}
    out, expected, report, graphs = _compile(SdpaAttention(**options), q, k, v, mask)
    assert_close(out, expected)
    assert report.replaced == {"attention": 1} and not report.fallbacks
    ((_, call_kwargs),) = _ops_calls(graphs)
    assert {"key_padding_mask", "bias"} & set(call_kwargs) == ({mask_kwarg} if mask_kwarg else set())


def test_attention_on_dynamic_shapes(device):
    """Sizes Dynamo made symbolic: a check that held while compiling is guarded, so an input that
    breaks it (causal with q_len != kv_len) recompiles and falls back instead of running wrongly."""
    torch._dynamo.reset()
    model, report = SdpaAttention(is_causal=True), Report()
    compiled = torch.compile(model, backend=tritonize_backend(report))
    with torch.inference_mode():
        for q_len, kv_len in ((8, 8), (12, 12), (5, 9), (6, 6)):  # (12, 12) recompiles with symbolic lengths
            q, k, v = _qkv(device, q_len=q_len, kv_len=kv_len)
            assert_close(compiled(q, k, v), model(q, k, v))
    assert report.replaced == {"attention": 1}  # the static and the symbolic graph rewrite alike: one node
    assert [reason for _, reason in report.fallbacks] == ["causal with q_len != kv_len [sdpa]"]


@pytest.mark.parametrize(
    "model, shapes, reason",
    [(SdpaAttention(), {"head_dim": 8}, "head_dim 8 is outside 16..256"),
     (ExplicitAttention(None), {"head_dim": 8}, "head_dim 8 is outside 16..256"),
     (SdpaAttention(is_causal=True), {"q_len": 3}, "causal with q_len != kv_len")],
    ids=["sdpa_head_dim", "explicit_head_dim", "causal_cross"],
)
def test_attention_fallbacks(model, shapes, reason, device):
    q, k, v = _qkv(device, **shapes)
    out, expected, report, _ = _compile(model.eval(), q, k, v)
    assert_close(out, expected)
    assert not report.replaced and reason in _reasons(report)


class IntegerMaskAttention(nn.Module):
    """Attention under the user's int64 attention_mask converted to bool, as HF's mask builders do."""

    def __init__(self, via_sdpa: bool, mask_read_elsewhere: bool = False) -> None:
        super().__init__()
        self.via_sdpa, self.mask_read_elsewhere = via_sdpa, mask_read_elsewhere

    def forward(self, q, k, v, attention_mask):
        keep = attention_mask.to(torch.bool)
        if self.via_sdpa:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        else:
            out = tritonize.ops.attention(q, k, v, key_padding_mask=keep)
        return (out, keep.sum(-1)) if self.mask_read_elsewhere else out


def _casts_to_bool(graphs) -> int:
    return sum(n.op == "call_method" and n.target == "to" and fake(n).dtype == torch.bool
               for gm in graphs for n in gm.graph.nodes)


def _key_padding_masks(graphs) -> list[torch.Tensor]:
    """The (fake) key-padding mask of every attention call: the op Dynamo traced from ops.attention, with
    the mask the sixth argument, or the ops.attention call a pattern wrote, with it by keyword."""
    masks = []
    for node in (n for gm in graphs for n in gm.graph.nodes if n.op == "call_function"):
        if node.target is torch.ops.tritonize.attention.default:
            masks.append(node.args[5])
        elif node.target is tritonize.ops.attention:
            masks.append(node.kwargs.get("key_padding_mask"))
    return [fake(mask) for mask in masks if mask is not None]


@pytest.mark.parametrize("via_sdpa", [False, True], ids=["ops_attention", "sdpa"])
@pytest.mark.parametrize("mask_read_elsewhere", [False, True])
def test_integer_padding_mask_is_read_by_the_kernel(via_sdpa, mask_read_elsewhere, device):
    """The bool conversion of an integer mask read only as a key-padding mask leaves the graph (the kernel
    tests nonzero itself); one that something else also reads stays."""
    q, k, v = _qkv(device)
    attention_mask = torch.ones(2, 9, dtype=torch.int64, device=device)
    attention_mask[1, 6:] = 0
    attention_mask[0, 2] = 2  # nonzero attends, whatever its value
    model = IntegerMaskAttention(via_sdpa, mask_read_elsewhere)
    out, expected, report, graphs = _compile(model, q, k, v, attention_mask)
    if mask_read_elsewhere:
        (out, kept), (expected, expected_kept) = out, expected
        assert torch.equal(kept, expected_kept)
    assert_close(out, expected)
    assert not report.fallbacks
    assert _casts_to_bool(graphs) == (1 if mask_read_elsewhere else 0)
    masks = _key_padding_masks(graphs)
    assert [m.dtype for m in masks] == [torch.bool if mask_read_elsewhere else torch.int64]


# -- a real model, and a pattern taught through the registry --------------------------------------


# HF's eager mask is finfo.min; the kernel's scaling takes it to -inf (intended), which numpy notes on CPU
@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_tiny_hf_bert(attn_implementation, device):
    from transformers import BertConfig, BertModel

    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100
    )
    model = BertModel._from_config(config, attn_implementation=attn_implementation).to(device).eval()
    ids = torch.randint(0, 100, (2, 9), device=device)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, 6:] = 0
    out, expected, report, _ = _compile(model, ids, attention_mask)
    assert_close(out.last_hidden_state, expected.last_hidden_state)
    assert_close(out.pooler_output, expected.pooler_output)
    # per layer: q, k, v, out (+ residual), up (+ gelu), down (+ residual); the pooler (+ tanh); out and down
    # then join the LayerNorm after them; the embeddings' three lookups, sums and LayerNorm become one op
    assert report.replaced == {"attention": 2, "embedding_layer_norm": 1, "layer_norm": 4, "linear": 13,
                               "linear_layer_norm": 4}
    assert not report.fallbacks


def test_patterns_doc_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", PATTERNS_DOC.read_text(), flags=re.S)
    (block,) = [b for b in blocks if "@register_pattern" in b]
    torch._dynamo.reset()
    try:
        exec(compile(block, str(PATTERNS_DOC), "exec"), {})
        assert "linear_swish" in DEFAULT_REGISTRY.names()
    finally:
        DEFAULT_REGISTRY.unregister("linear_swish")


def test_separate_registry_runs_only_its_patterns(device):
    registry = Registry()
    registry.register("linear", name="linear_plain", stage="lower")(linear_plain)
    x = torch.randn(2, 5, 32, device=device)
    out, expected, report, graphs = _compile(MLP(nn.GELU()).to(device).eval(), x, registry=registry)
    assert_close(out, expected)
    assert report.replaced == {"linear": 2}  # both alone: no fusion pattern in this registry
    assert all(set(kwargs) == set() for _, kwargs in _ops_calls(graphs))


def test_a_replacement_moves_across_runtime_assertions_but_not_in_place_ops():
    """Dynamo's checks of symbolic sizes (`aten._assert_scalar`, which torch 2.11 puts into HF BERT's embeddings)
    write no tensor: a replacement may move its computation across them, and they stay in the graph; an in-place
    op in the same place still blocks it."""
    for moves in (True, False):
        graph = torch.fx.Graph()
        x = graph.placeholder("x")
        y = graph.call_function(torch.relu, (x,))
        if moves:
            between = graph.call_function(torch.ops.aten._assert_scalar.default, (True, "never fails")).target
        else:
            graph.call_method("add_", (x, 1.0))
        graph.output(graph.call_function(torch.neg, (y,)))
        end = [n for n in graph.nodes if n.target is torch.neg][0]
        if moves:
            replace(end, torch.abs, y)
            assert [n.target for n in graph.nodes if n.op == "call_function"] == [torch.relu, torch.abs, between]
        else:
            with pytest.raises(Reject, match="in-place ops"):
                replace(end, torch.abs, y)
