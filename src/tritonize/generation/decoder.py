"""A static-KV-cache engine for decoder-only HF models, built on tritonize's ops (gpt-fast style).

The engine reads an HF causal LM's weights once: Q, K and V fused into one projection, gate and up into
one `gated_mlp` weight. With tp_size == 1 the HF parameters are re-pointed at views of the fused
tensors, so the model and the engine share one copy of the weights (and the HF model keeps working).
Caches are preallocated [batch, kv_heads, max_len, head_dim]; each sequence's length lives in a device
buffer that `step` advances itself, so a step has fixed shapes and no host sync (one CUDA graph). Every
tensor a step reads or writes keeps its address until `reserve` grows the caches, so the decode loop's
graphs are kept across calls in `decode_graphs` (emptied when the caches move).

`prefill_bucketed` pads the prompts on the left up to the bucket length (prompt length rounded up to 64)
with masked positions, in input buffers kept per (batch, bucket length) in `prefill_graphs`; on CUDA
their prefill is one CUDA graph per bucket, kept like the decode graphs (same pool, same drops). The
extra padding changes nothing for the real tokens: their positions come from the mask, and the padded
keys are masked in prefill and lie before key_start in the decode steps.

Prompts arrive left-aligned to the end (left padding): sequence b's real tokens fill positions
key_start[b] .. prompt_len - 1 of the cache and take rotary / learned positions 0, 1, ... as HF's
cumsum(attention_mask) - 1 gives them.

Tensor parallelism (tp_size > 1, Megatron style): each rank keeps its share of the heads (Q and KV) and of
the MLP's intermediate columns; the attention output and down projections are split by their input
and summed over the ranks (generation/collectives.py), the bias and the residual added on rank 0 only.
The output projection is split by vocabulary rows (when they divide evenly) and the logits gathered;
the embeddings stay whole on every rank. The engine's weights live on `device` (default: the model's);
the HF parameters are shared only when tp_size == 1 and the devices agree, otherwise the engine holds
copies of its slices, so a model kept on the CPU costs each GPU only its own shards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tritonize import ops
from tritonize.generation.collectives import RankCollectives
from tritonize.generation.loop import DecodeGraphCache, PromptGraphCache, bucket_length, round_up
from tritonize.generation.settings import HF_ACTIVATIONS, decode_layer_chain_enabled
from tritonize.passes.sibling_linears import pack_parameters

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")
CACHE_LENGTH_MULTIPLE = 64  # caches grow in steps of this many positions
# position-dependent rope variants whose cos/sin change with the sequence length: a fixed table can't hold them
DYNAMIC_ROPE_TYPES = ("dynamic", "longrope")


def parameter_addresses(model: torch.nn.Module) -> list[int]:
    """The data addresses of every parameter of `model` (a shared one once per place it is registered), in
    module order: a replaced or moved parameter changes the list. A walk over the modules' own
    dictionaries, several times quicker than `model.parameters()` (each generate call makes this check)."""
    modules = [model]
    for module in modules:  # grows as it goes: breadth first
        if module is not None:
            modules.extend(module._modules.values())
    return [p.data_ptr() for module in modules if module is not None
            for p in module._parameters.values() if p is not None]


def left_aligned(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's real tokens (mask nonzero), in order, moved to the end of the row, its padding before them:
    left padding. Scattered to places from cumulative sums: fixed shapes, no host sync (graph-capturable)."""
    real = attention_mask.bool()
    real_before = real.cumsum(1) - 1  # among the real tokens: this one's index (the last row entry: count - 1)
    first_real = real.shape[1] - 1 - real_before[:, -1:]  # where the row's real tokens begin once aligned
    destination = torch.where(real, first_real + real_before, (~real).cumsum(1) - 1)
    aligned_ids = torch.empty_like(input_ids).scatter_(1, destination, input_ids)
    return aligned_ids, torch.empty_like(real).scatter_(1, destination, real)


@dataclass
class Norm:
    weight: torch.Tensor
    bias: torch.Tensor | None
    eps: float
    rms: bool  # RMSNorm (Llama-style), else LayerNorm

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.layer_norm(x, self.weight, self.bias, self.eps)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """linear(self(x), weight, bias); an RMSNorm fused into the projection (one kernel at decode sizes)."""
        if self.rms:
            return ops.rms_norm_linear(x, self.weight, weight, bias, eps=self.eps)
        return ops.linear(self(x), weight, bias)

    def gated_mlp(self, x: torch.Tensor, gate_up_weight: torch.Tensor, bias: torch.Tensor | None,
                  activation: str) -> torch.Tensor:
        """gated_mlp(self(x), ...), fused like `linear`."""
        if self.rms:
            return ops.rms_norm_gated_mlp(x, self.weight, gate_up_weight, eps=self.eps, activation=activation,
                                          bias=bias)
        return ops.gated_mlp(self(x), gate_up_weight, activation=activation, bias=bias)


@dataclass
class Layer:
    attn_norm: Norm
    qkv_weight: torch.Tensor  # [(heads + 2 * kv_heads) * head_dim, hidden] of this rank
    qkv_bias: torch.Tensor | None
    q_norm: Norm | None  # Qwen3: RMSNorm of each head of q and k before rotary
    k_norm: Norm | None
    o_weight: torch.Tensor  # [hidden, heads * head_dim]
    o_bias: torch.Tensor | None  # rank 0 only
    mlp_norm: Norm
    up_weight: torch.Tensor  # gated: cat([gate, up]) [2 * intermediate, hidden]; else the up projection
    up_bias: torch.Tensor | None
    down_weight: torch.Tensor
    down_bias: torch.Tensor | None  # rank 0 only
    gated: bool  # act(gate) * up (Llama family), else act(up) (GPT-2)
    scale: float


class DecoderEngine:
    """Prefill and one-token decode steps of a decoder-only HF causal LM on preallocated caches.

    model: an HF *ForCausalLM of a type in SUPPORTED_MODEL_TYPES, in eval mode. tp_rank / tp_size /
    process_group: tensor parallelism over torch.distributed (see the module docstring). device: where
    the engine's weights and caches live (default: the model's device).
    """

    def __init__(self, model: torch.nn.Module, *, tp_rank: int = 0, tp_size: int = 1, process_group=None,
                 device: torch.device | str | None = None, all_reduce: str = "auto") -> None:
        config = model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"tritonize generation does not support model type {config.model_type!r} "
                             f"({type(model).__name__}); supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank must be in [0, tp_size={tp_size}), got {tp_rank}")
        self.model, self.config = model, config
        self.tp_rank, self.tp_size, self.process_group = tp_rank, tp_size, process_group
        self.all_reduce = all_reduce
        self.requested_device = device
        self.device = torch.device(device) if device is not None else model.lm_head.weight.device
        self.shares_weights = tp_size == 1 and self.device == model.lm_head.weight.device
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        if self.heads % tp_size or self.kv_heads % tp_size:
            raise ValueError(f"tp_size {tp_size} must divide the heads ({self.heads}) and kv heads ({self.kv_heads})")
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.local_heads, self.local_kv_heads = self.heads // tp_size, self.kv_heads // tp_size
        activation = getattr(config, "hidden_act", None) or getattr(config, "activation_function", None)
        if activation not in HF_ACTIVATIONS:
            raise ValueError(f"tritonize generation does not support the activation {activation!r}; "
                             f"supported: {', '.join(HF_ACTIVATIONS)}")
        self.activation = HF_ACTIVATIONS[activation]
        self.gpt2 = config.model_type == "gpt2"
        self.layers = self._read_gpt2() if self.gpt2 else self._read_llama_like()
        tied = model.lm_head.weight is model.get_input_embeddings().weight
        self.vocab_parallel = tp_size > 1 and model.lm_head.weight.shape[0] % tp_size == 0
        if self.vocab_parallel:  # each rank reads 1/tp_size of the output projection, logits gathered
            self.lm_head = self._shard(model.lm_head.weight, 0)
        else:
            self.lm_head = self.embed if tied else self._local(model.lm_head.weight)  # a tied one is copied once
        self.collectives = (RankCollectives(process_group, self.device, self.embed.dtype, all_reduce)
                            if tp_size > 1 else None)
        self.cache_batch = self.cache_len = 0
        # decode steps may chain each block's GEMVs in one persistent kernel (`chains_layers`; off unless
        # TRITONIZE_DECODE_LAYER_CHAIN=1, see settings.py); its grid barriers count in chain_counter
        self.chain_layers = decode_layer_chain_enabled()
        self.chainable = (tp_size == 1 and not self.gpt2 and self.final_norm.rms
                          and all(layer.gated and layer.attn_norm.rms and layer.mlp_norm.rms for layer in self.layers))
        self.chain_counter = torch.zeros(1, dtype=torch.int32, device=self.device)
        self.weight_addresses = parameter_addresses(model)
        self.decode_graphs = DecodeGraphCache()  # the decode loops captured over this engine's buffers
        # prefill_bucketed's input buffers and CUDA graphs, per (batch, bucket length)
        self.prefill_graphs = PromptGraphCache(self._prefill_padded_anywhere, self.decode_graphs)

    # -- reading the HF weights -------------------------------------------------------------------

    def _local(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """t on the engine's device: t itself (shared with the model) when it is there already."""
        return None if t is None else t.to(self.device)

    def _shard(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's 1/tp_size of t along dim, on the engine's device."""
        if t.shape[dim] % self.tp_size:
            raise ValueError(f"tritonize: dim {dim} of a weight of shape {tuple(t.shape)} does not split in "
                             f"{self.tp_size} parts")
        part = t.shape[dim] // self.tp_size
        return t.narrow(dim, self.tp_rank * part, part).to(self.device).contiguous()

    def _qkv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """This rank's heads of q, k and v (weights [rows, hidden] or biases), fused."""
        return torch.cat([self._shard(q, 0), self._shard(k, 0), self._shard(v, 0)])

    def _rank0(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        return self._local(bias) if self.tp_rank == 0 else None

    def _read_llama_like(self) -> list[Layer]:
        base, config = self.model.model, self.config
        self.embed = self._local(base.embed_tokens.weight)
        self.final_norm = Norm(self._local(base.norm.weight), None, base.norm.variance_epsilon, rms=True)
        self.rotary_emb = base.rotary_emb
        rope = getattr(config, "rope_parameters", None) or {}
        if rope.get("rope_type") in DYNAMIC_ROPE_TYPES:
            raise ValueError(f"tritonize generation does not support rope_type {rope['rope_type']!r} "
                             "(its cos/sin depend on the sequence length)")
        layers = []
        for block in base.layers:
            attn, mlp = block.self_attn, block.mlp
            projections = (attn.q_proj, attn.k_proj, attn.v_proj)
            has_qkv_bias = attn.q_proj.bias is not None
            if self.shares_weights:
                qkv_weight = pack_parameters([p.weight for p in projections])
                qkv_bias = pack_parameters([p.bias for p in projections]) if has_qkv_bias else None
                up_weight = pack_parameters([mlp.gate_proj.weight, mlp.up_proj.weight])
                up_bias = (pack_parameters([mlp.gate_proj.bias, mlp.up_proj.bias])
                           if mlp.gate_proj.bias is not None else None)
            else:
                qkv_weight = self._qkv(*(p.weight for p in projections))
                qkv_bias = self._qkv(*(p.bias for p in projections)) if has_qkv_bias else None
                gate, up = mlp.gate_proj, mlp.up_proj
                up_weight = ops.concat_gate_up(self._shard(gate.weight, 0), self._shard(up.weight, 0))
                up_bias = (ops.concat_gate_up(self._shard(gate.bias, 0), self._shard(up.bias, 0))
                           if gate.bias is not None else None)
            head_norms = [Norm(self._local(m.weight), None, m.variance_epsilon, rms=True) if m is not None else None
                          for m in (getattr(attn, "q_norm", None), getattr(attn, "k_norm", None))]
            layers.append(Layer(
                attn_norm=Norm(self._local(block.input_layernorm.weight), None,
                               block.input_layernorm.variance_epsilon, rms=True),
                qkv_weight=qkv_weight, qkv_bias=qkv_bias, q_norm=head_norms[0], k_norm=head_norms[1],
                o_weight=self._shard(attn.o_proj.weight, 1), o_bias=self._rank0(attn.o_proj.bias),
                mlp_norm=Norm(self._local(block.post_attention_layernorm.weight), None,
                              block.post_attention_layernorm.variance_epsilon, rms=True),
                up_weight=up_weight, up_bias=up_bias,
                down_weight=self._shard(mlp.down_proj.weight, 1), down_bias=self._rank0(mlp.down_proj.bias),
                gated=True, scale=attn.scaling,
            ))
        return layers

    def _read_gpt2(self) -> list[Layer]:
        base, config = self.model.transformer, self.config
        self.embed, self.position_embed = self._local(base.wte.weight), self._local(base.wpe.weight)
        self.final_norm = Norm(self._local(base.ln_f.weight), self._local(base.ln_f.bias), base.ln_f.eps, rms=False)
        hidden = config.hidden_size
        layers = []
        for i, block in enumerate(base.h):
            attn, mlp = block.attn, block.mlp
            if self.shares_weights:  # Conv1D weights [in, out] become nn.Linear layout, shared with the model
                qkv_weight, qkv_bias = pack_parameters([attn.c_attn.weight], conv1d=True), attn.c_attn.bias
                o_weight = pack_parameters([attn.c_proj.weight], conv1d=True)
                up_weight = pack_parameters([mlp.c_fc.weight], conv1d=True)
                down_weight, up_bias = pack_parameters([mlp.c_proj.weight], conv1d=True), mlp.c_fc.bias
            else:
                qkv_weight = self._qkv(*attn.c_attn.weight.t().split(hidden))
                qkv_bias = self._qkv(*attn.c_attn.bias.split(hidden))
                o_weight = self._shard(attn.c_proj.weight.t(), 1)
                up_weight, up_bias = self._shard(mlp.c_fc.weight.t(), 0), self._shard(mlp.c_fc.bias, 0)
                down_weight = self._shard(mlp.c_proj.weight.t(), 1)
            scale = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
            if config.scale_attn_by_inverse_layer_idx:
                scale /= i + 1
            layers.append(Layer(
                attn_norm=Norm(self._local(block.ln_1.weight), self._local(block.ln_1.bias), block.ln_1.eps, rms=False),
                qkv_weight=qkv_weight, qkv_bias=qkv_bias, q_norm=None, k_norm=None,
                o_weight=o_weight, o_bias=self._rank0(attn.c_proj.bias),
                mlp_norm=Norm(self._local(block.ln_2.weight), self._local(block.ln_2.bias), block.ln_2.eps, rms=False),
                up_weight=up_weight, up_bias=up_bias,
                down_weight=down_weight, down_bias=self._rank0(mlp.c_proj.bias), gated=False, scale=scale,
            ))
        return layers

    def is_current(self) -> bool:
        """False once any model parameter was replaced or moved (model.to(...), a new nn.Parameter): rebuild."""
        return parameter_addresses(self.model) == self.weight_addresses

    def rebuilt(self) -> DecoderEngine:
        """A new engine over the model's current parameters, on this one's ranks, group and device, chaining
        layers if this one does (`chain_layers`, which may have been set by hand)."""
        engine = DecoderEngine(self.model, tp_rank=self.tp_rank, tp_size=self.tp_size,
                               process_group=self.process_group, device=self.requested_device,
                               all_reduce=self.all_reduce)
        engine.chain_layers = self.chain_layers
        return engine

    # -- caches -------------------------------------------------------------------------------------

    def reserve(self, batch: int, max_len: int, *, padding: int = 0) -> None:
        """Caches for at least `batch` sequences of `max_len` positions (prompt + new tokens) after `padding`
        positions of extra left padding (`prefill_bucketed`'s: bucket length - prompt length); grows only.
        max_len is checked against the model's sliding window and learned positions; the padding holds no
        token, so it is not.

        Growing reallocates every buffer a step reads, so the captured decode and prefill graphs are dropped.
        """
        window = getattr(self.config, "sliding_window", None)
        if window is not None and max_len > window:
            raise ValueError(f"prompt + max_new_tokens = {max_len} exceeds the model's sliding window ({window}), "
                             "which tritonize generation does not implement")
        if self.gpt2 and max_len > self.position_embed.shape[0]:
            raise ValueError(f"prompt + max_new_tokens = {max_len} exceeds GPT-2's {self.position_embed.shape[0]} "
                             "learned positions")
        cache_len = padding + max_len
        if batch <= self.cache_batch and cache_len <= self.cache_len:
            return
        self.decode_graphs.clear()
        self.prefill_graphs.clear()
        self.cache_batch = max(batch, self.cache_batch)
        self.cache_len = max(round_up(cache_len, CACHE_LENGTH_MULTIPLE), self.cache_len)
        shape = (self.cache_batch, self.local_kv_heads, self.cache_len, self.head_dim)
        weight = self.layers[0].qkv_weight
        self.k_caches = [weight.new_zeros(shape) for _ in self.layers]
        self.v_caches = [weight.new_zeros(shape) for _ in self.layers]
        # per sequence: its first valid key (after left padding) and its length, written by prefill
        self.key_start = torch.zeros(self.cache_batch, dtype=torch.int32, device=weight.device)
        self.cache_seqlens = torch.zeros(self.cache_batch, dtype=torch.int32, device=weight.device)
        if not self.gpt2:
            positions = torch.arange(self.cache_len, device=weight.device)[None]
            cos, sin = self.rotary_emb(weight[:1], positions)  # HF's own rope numerics (scaling types included)
            self.cos, self.sin = cos[0], sin[0]

    # -- forward --------------------------------------------------------------------------------------

    def _sum_ranks(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.collectives is None else self.collectives.sum(x)

    def _rotation(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos, sin [batch, seq, rotary_dim] at positions [batch, seq], gathered once for every layer."""
        return None if self.gpt2 else (self.cos[positions], self.sin[positions])

    def _layer(self, index: int, h: torch.Tensor, rotation, write_at: torch.Tensor, attend) -> torch.Tensor:
        """Block `index` on h [batch, seq, hidden]; rotation: `_rotation(positions)`; write_at: int32 [batch], the
        cache position of each sequence's first token here; `attend(index, q)`, once k and v are in the caches,
        returns [batch, seq, heads, dim] (seq-major: reshaped to the hidden size without a copy)."""
        layer = self.layers[index]
        rank0 = self.tp_rank == 0
        qkv = layer.attn_norm.linear(h, layer.qkv_weight, layer.qkv_bias)
        out = self._attention(index, qkv, rotation, write_at, attend)
        h = self._sum_ranks(ops.linear(out, layer.o_weight, layer.o_bias, residual=h if rank0 else None))
        if layer.gated:
            x = layer.mlp_norm.gated_mlp(h, layer.up_weight, layer.up_bias, self.activation)
        else:
            x = ops.linear(layer.mlp_norm(h), layer.up_weight, layer.up_bias, activation=self.activation)
        return self._sum_ranks(ops.linear(x, layer.down_weight, layer.down_bias, residual=h if rank0 else None))

    def _attention(self, index: int, qkv: torch.Tensor, rotation, write_at: torch.Tensor, attend) -> torch.Tensor:
        """Block `index`'s attention from its QKV projection [batch, seq, (heads + 2 kv_heads) * head_dim]: the
        Qwen3 q/k norms, rotary, the new keys and values into the caches, `attend`; [batch, seq, heads * dim]."""
        layer = self.layers[index]
        batch, seq, _ = qkv.shape
        qkv = qkv.view(batch, seq, self.local_heads + 2 * self.local_kv_heads, self.head_dim)
        q, k, v = qkv.split([self.local_heads, self.local_kv_heads, self.local_kv_heads], dim=2)
        if layer.q_norm is not None:
            q, k = layer.q_norm(q), layer.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = rotation if rotation is not None else (None, None)
        q = ops.rotary_cache_write(q, k, v, cos, sin, self.k_caches[index], self.v_caches[index], write_at)
        return attend(index, q).reshape(batch, seq, self.local_heads * self.head_dim)

    def _chained_layers(self, h: torch.Tensor, rotation, write_at: torch.Tensor, attend) -> torch.Tensor:
        """Every block on h [batch, 1, hidden] and the logits [batch, vocab] of a decode step, each block's
        output projection, MLP and the next QKV projection (the last block's: final norm and lm_head) in one
        `ops.decoder_layer_chain`; same results as `_layer` for each block then `_logits`."""
        h = h[:, 0]
        first = self.layers[0]
        qkv = first.attn_norm.linear(h, first.qkv_weight, first.qkv_bias)
        for index, layer in enumerate(self.layers):
            out = self._attention(index, qkv[:, None], rotation, write_at, attend)[:, 0]
            following = self.layers[index + 1] if index + 1 < len(self.layers) else None
            norm, weight, bias = ((following.attn_norm, following.qkv_weight, following.qkv_bias) if following
                                  else (self.final_norm, self.lm_head, None))
            h, qkv = ops.decoder_layer_chain(
                out, h, o_weight=layer.o_weight, o_bias=layer.o_bias, mlp_norm_weight=layer.mlp_norm.weight,
                mlp_eps=layer.mlp_norm.eps, gate_up_weight=layer.up_weight, gate_up_bias=layer.up_bias,
                down_weight=layer.down_weight, down_bias=layer.down_bias, next_norm_weight=norm.weight,
                next_eps=norm.eps, next_weight=weight, next_bias=bias, activation=self.activation,
                counter=self.chain_counter,
            )  # fmt: skip
        return qkv

    def chains_layers(self) -> bool:
        """Whether decode steps run through `_chained_layers`: `chain_layers` on, one GPU (no tensor
        parallelism), Llama-style blocks (RMSNorms, gated MLPs). (`ops.decoder_layer_chain` itself runs its
        four ops one by one where its kernel does not apply, e.g. above two rows.)"""
        return self.chain_layers and self.chainable

    def _embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = F.embedding(tokens, self.embed)
        return h + F.embedding(positions, self.position_embed) if self.gpt2 else h

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.final_norm.linear(h, self.lm_head, None)
        return self.collectives.gather_last_dim(logits) if self.vocab_parallel else logits

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Runs left-padded prompts [batch, prompt_len] (mask True = real token) into the caches.

        Call `reserve` first. Returns the logits of each sequence's last prompt token, [batch, vocab].
        """
        batch, prompt_len = input_ids.shape
        positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        self.key_start[:batch].copy_(prompt_len - attention_mask.sum(-1))
        self.cache_seqlens[:batch].fill_(prompt_len)

        def attend(index, q):
            k, v = self.k_caches[index][:batch, :, :prompt_len], self.v_caches[index][:batch, :, :prompt_len]
            return ops.attention(q, k, v, scale=self.layers[index].scale, causal=True, key_padding_mask=attention_mask,
                                 seq_major=True)

        h, rotation = self._embed(input_ids, positions), self._rotation(positions)
        write_at = torch.zeros(batch, dtype=torch.int32, device=input_ids.device)
        for index in range(len(self.layers)):
            h = self._layer(index, h, rotation, write_at, attend)
        return self._logits(h[:, -1])

    def _prefill_padded_anywhere(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.prefill(*left_aligned(input_ids, attention_mask))

    def prefill_bucketed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, *,
                         cuda_graph: bool = True) -> torch.Tensor:
        """`prefill` of prompts [batch, prompt_len] padded anywhere (attention_mask nonzero = real token; None:
        all real), in the input buffers of their bucket: prompt_len rounded up to 64, the extra positions
        masked and on the left. Each row's real tokens are moved to its end on the device (left padding).
        On CUDA with cuda_graph the bucket's CUDA graph replays (captured on its first use); otherwise the
        prefill runs eagerly on the same buffers. Call `reserve(batch, prompt_len + max_new_tokens,
        padding=bucket_length(prompt_len) - prompt_len)` first.

        Returns the logits [batch, vocab] of each row's last real token; from a graph, its output buffer,
        which the engine's next graph replay (prefill or decode step) may overwrite: clone it to keep it.
        """
        batch, prompt_len = input_ids.shape
        padded_len = bucket_length(prompt_len)
        if batch > self.cache_batch or padded_len > self.cache_len:
            raise ValueError(f"prefill_bucketed: {batch} prompts padded to {padded_len} positions need caches of "
                             f"at least that size, reserved {self.cache_batch} x {self.cache_len}: call "
                             f"reserve(batch, prompt_len + max_new_tokens, padding={padded_len - prompt_len})")
        padding = padded_len - prompt_len

        def allocate_inputs() -> tuple[torch.Tensor, torch.Tensor]:
            return (torch.zeros((batch, padded_len), dtype=torch.long, device=self.device),
                    torch.zeros((batch, padded_len), dtype=torch.bool, device=self.device))

        def fill_inputs(ids: torch.Tensor, mask: torch.Tensor) -> None:
            ids[:, :padding].zero_()
            ids[:, padding:].copy_(input_ids)
            mask[:, :padding].fill_(False)
            if attention_mask is None:
                mask[:, padding:].fill_(True)
            else:
                mask[:, padding:].copy_(attention_mask)  # nonzero -> True

        graphed = cuda_graph and self.device.type == "cuda"
        return self.prefill_graphs.run((batch, padded_len), allocate_inputs, fill_inputs, graphed)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Appends tokens int64 [batch] to each sequence and returns the next logits [batch, vocab].

        Fixed shapes, lengths read and advanced on the device: capturable in a CUDA graph.
        """
        batch = tokens.shape[0]
        cache_seqlens, key_start = self.cache_seqlens[:batch], self.key_start[:batch]
        positions = (cache_seqlens - key_start).long()[:, None]
        seqlens = cache_seqlens + 1

        def attend(index, q):
            k_cache, v_cache = self.k_caches[index][:batch], self.v_caches[index][:batch]
            out = ops.decode_attention(q, k_cache, v_cache, seqlens, scale=self.layers[index].scale,
                                       key_start=key_start)
            return out.transpose(1, 2)  # one query token: [batch, 1, heads, dim] is still one block of memory

        h, rotation = self._embed(tokens[:, None], positions), self._rotation(positions)
        if self.chains_layers():
            logits = self._chained_layers(h, rotation, cache_seqlens, attend)
            cache_seqlens.copy_(seqlens)
            return logits
        for index in range(len(self.layers)):
            h = self._layer(index, h, rotation, cache_seqlens, attend)
        cache_seqlens.copy_(seqlens)
        return self._logits(h[:, 0])
