"""Plain-PyTorch definitions of every tritonize kernel.

These are the specifications: the Triton kernels must compute the same functions. They run in the
input dtype promoted to at least fp32 (fp64 inputs stay fp64, which is how tests build their gold
values) and return the input dtype. Nothing here may import triton, torch.fx or transformers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "tanh")

# How close a kernel's output stored in each dtype must be to these definitions computed in fp64, as a
# relative error ||out - ref|| / ||ref||: exact fp32 accumulation, and the rounding of fp16 / bf16 storage.
RELATIVE_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
RMS_NORM_VARIANTS = ("llama", "t5", "gemma")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q @ k^T * scale + bias, masked) @ v; rows with every key masked give zeros.

    q: [batch, heads, q_len, head_dim]; k, v: [batch, kv_heads, kv_len, head_dim] with kv_heads
    dividing heads. Causal masking is aligned to the end: query i sees keys j <= i + kv_len - q_len.
    key_padding_mask: bool or integer [batch, kv_len], True / nonzero = attend. bias: additive, broadcastable to
    [batch, heads, q_len, kv_len].
    """
    dtype = _compute_dtype(q.dtype)
    heads, kv_heads = q.shape[1], k.shape[1]
    q_len, kv_len = q.shape[2], k.shape[2]
    k = k.to(dtype).repeat_interleave(heads // kv_heads, dim=1)
    v = v.to(dtype).repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.matmul(q.to(dtype), k.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.to(dtype)
    allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device)
    if causal:
        allowed = torch.tril(allowed, diagonal=kv_len - q_len)
    allowed = allowed.expand(q.shape[0], 1, q_len, kv_len)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :].bool()
    scores = scores.masked_fill(~allowed, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    weights = torch.where(denom > 0, weights / denom, torch.zeros_like(weights))
    return torch.matmul(weights, v).to(q.dtype)


def activation(y: torch.Tensor, name: str | None) -> torch.Tensor:
    if name is None:
        return y
    if name == "relu":
        return F.relu(y)
    if name == "gelu":
        return F.gelu(y)
    if name == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if name == "silu":
        return F.silu(y)
    if name == "tanh":
        return torch.tanh(y)
    raise ValueError(f"activation must be one of {ACTIVATIONS} or None, got {name!r}")


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation_name: str | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """activation(x @ weight^T + bias) + residual, accumulated in at least fp32."""
    dtype = _compute_dtype(x.dtype)
    y = torch.matmul(x.to(dtype), weight.to(dtype).t())
    if bias is not None:
        y = y + bias.to(dtype)
    y = activation(y, activation_name)
    if residual is not None:
        y = y + residual.to(dtype)
    return y.to(x.dtype)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dim of h = x + residual; returns (norm(h), h) in x's dtype."""
    dtype = _compute_dtype(x.dtype)
    h = x.to(dtype) if residual is None else x.to(dtype) + residual.to(dtype)
    mean = h.mean(dim=-1, keepdim=True)
    var = (h - mean).pow(2).mean(dim=-1, keepdim=True)
    y = (h - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(dtype)
    if bias is not None:
        y = y + bias.to(dtype)
    return y.to(x.dtype), h.to(x.dtype)


def counted_positions(token_ids: torch.Tensor, padding_idx: int, past_length: int = 0) -> torch.Tensor:
    """Each token's position counted past padding (fairseq's make_positions, HF RoBERTa's position ids):
    padding_idx for a padding_idx token, else padding_idx + past_length + the number of other tokens up to and
    including it along the last dim."""
    real = token_ids != padding_idx
    return torch.where(real, real.long().cumsum(-1) + padding_idx + past_length, padding_idx)


def embedding_layer_norm(
    ids: list[torch.Tensor | None],
    tables: list[torch.Tensor],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    id_maps: list[torch.Tensor | None] | None = None,
    positions_from: torch.Tensor | None = None,
    padding_idx: int = 0,
    past_length: int = 0,
) -> torch.Tensor:
    """LayerNorm of tables[0][ids[0]] + tables[1][ids[1]] + ..., summed in order in the tables' dtype (each sum
    rounded as eager adds store it; ids broadcast together). id_maps[i], when given ([n] or [1, n]): the ids
    of lookup i index it first, tables[i][id_maps[i][ids[i]]]. An ids entry None reads
    counted_positions(positions_from, padding_idx, past_length)."""
    ids = [counted_positions(positions_from, padding_idx, past_length) if i is None else i for i in ids]
    id_maps = id_maps or [None] * len(ids)
    rows = [t[i if m is None else m.reshape(-1)[i]] for i, t, m in zip(ids, tables, id_maps, strict=True)]
    total = rows[0]
    for row in rows[1:]:
        total = total + row
    return layer_norm(total, weight, bias, eps)[0]


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    variant: str = "llama",
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim of h = x + residual; returns (norm(h), h) in x's dtype.

    variant "llama" and "t5": the normalized value is rounded to x's dtype, then multiplied by
    weight (HF's LlamaRMSNorm and T5LayerNorm); "gemma": multiplied by (1 + weight) in fp32, then
    rounded (HF's GemmaRMSNorm). The mean of squares is always taken in fp32 or wider.
    """
    if variant not in RMS_NORM_VARIANTS:
        raise ValueError(f"variant must be one of {RMS_NORM_VARIANTS}, got {variant!r}")
    dtype = _compute_dtype(x.dtype)
    h = x.to(dtype) if residual is None else x.to(dtype) + residual.to(dtype)
    normed = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + eps)
    if variant == "gemma":
        y = normed * (1.0 + weight.to(dtype))
    else:
        y = normed.to(x.dtype).to(dtype) * weight.to(dtype)
    return y.to(x.dtype), h.to(x.dtype)


# -- rotary embeddings (written as HF's apply_rotary_pos_emb) ----------------------------------------


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """cat(-x2, x1) over the halves x1, x2 of the last dim (Llama, GPT-NeoX)."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """(-x[2i+1], x[2i]) for each pair of the last dim (GPT-J)."""
    x1 = x[..., ::2]
    x2 = x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q * cos + rotate(q) * sin, the same for k) over the first rotary_dim dims; the rest pass through.

    q: [batch, heads, seq, head_dim]; k: [batch, kv_heads, seq, head_dim]; cos, sin: [batch or 1, seq,
    rotary_dim], rotary_dim even and <= head_dim. Half-rotation (interleaved=False, Llama/NeoX): rotate is
    rotate_half and cos/sin are HF's cat(freqs, freqs).cos() (halves repeated). Interleaved (GPT-J): rotate
    is rotate_every_two and cos/sin hold each frequency twice in a row (GPT-J's duplicate_interleave,
    cos[..., 2i] == cos[..., 2i + 1]). Computed in at least fp32, returned in q's dtype.
    """
    dtype = _compute_dtype(q.dtype)
    rotate = rotate_every_two if interleaved else rotate_half
    rotary_dim = cos.shape[-1]
    cos = cos.to(dtype).unsqueeze(1)
    sin = sin.to(dtype).unsqueeze(1)

    def apply(x):
        x = x.to(dtype)
        x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
        x_embed = (x_rot * cos) + (rotate(x_rot) * sin)
        return torch.cat((x_embed, x_pass), dim=-1).to(q.dtype)

    return apply(q), apply(k)


def rotary_cache_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    write_offsets: torch.Tensor,
    interleaved: bool = False,
) -> torch.Tensor:
    """`rotary(q, k, cos, sin)` (nothing rotated when cos is None), then k and v written in place into the
    caches [cache_batch, kv_heads, cache_len, head_dim]: token s of sequence b at position write_offsets[b] + s,
    positions outside [0, cache_len) skipped. Returns q rotated (q itself when cos is None)."""
    if cos is not None:
        q, k = rotary(q, k, cos, sin, interleaved)
    positions = write_offsets.long()[:, None] + torch.arange(k.shape[2], device=k.device)
    b, s = ((positions >= 0) & (positions < k_cache.shape[2])).nonzero(as_tuple=True)
    k_cache[b, :, positions[b, s]] = k[b, :, s].to(k_cache.dtype)
    v_cache[b, :, positions[b, s]] = v[b, :, s].to(v_cache.dtype)
    return q


# -- gated MLP ----------------------------------------------------------------------------------------

GATED_ACTIVATIONS = ("silu", "gelu", "gelu_tanh")  # SwiGLU, GeGLU (erf), GeGLU (tanh)


def gated_mlp(
    x: torch.Tensor, gate_up_weight: torch.Tensor, bias: torch.Tensor | None = None, activation_name: str = "silu"
) -> torch.Tensor:
    """act(x @ W_gate^T + b_gate) * (x @ W_up^T + b_up) with gate_up_weight = cat([W_gate, W_up], dim=0)
    [2 * intermediate, hidden] and bias = cat([b_gate, b_up]); accumulated in at least fp32."""
    dtype = _compute_dtype(x.dtype)
    y = torch.matmul(x.to(dtype), gate_up_weight.to(dtype).t())
    if bias is not None:
        y = y + bias.to(dtype)
    gate, up = y.chunk(2, dim=-1)
    return (activation(gate, activation_name) * up).to(x.dtype)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    scale: float,
    key_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of q_len new tokens against each sequence's valid cache positions; empty rows give zeros.

    q: [batch, heads, q_len, head_dim]; k_cache, v_cache: [batch, kv_heads, max_len, head_dim].
    Sequence b holds keys [key_start[b], cache_seqlens[b]) (lengths clamped to max_len), the last q_len
    of them being the new tokens: query i sits at position seqlen - q_len + i and sees keys up to it.
    """
    max_len = k_cache.shape[2]
    seqlens = cache_seqlens.tolist()
    starts = [0] * len(seqlens) if key_start is None else key_start.tolist()
    rows = []
    for b, (seqlen, start) in enumerate(zip(seqlens, starts, strict=True)):
        seqlen = min(max(seqlen, 0), max_len)
        if seqlen == 0:
            rows.append(torch.zeros_like(q[b : b + 1]))
            continue
        attend = torch.arange(seqlen, device=q.device) >= start
        rows.append(attention(q[b : b + 1], k_cache[b : b + 1, :, :seqlen], v_cache[b : b + 1, :, :seqlen],
                              scale, causal=True, key_padding_mask=attend[None, :]))
    return torch.cat(rows)
