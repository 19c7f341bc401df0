"""T5 (encoder-decoder) generation on tritonize ops: the encoder once per request, then a decoder step
that the shared decode loop (`generation.loop.decode_loop`) can capture in a CUDA graph.

`T5Engine` is built once per model and kept on it (rebuilt when a parameter is replaced or moved). It
owns the device state of a request in buffers that keep their addresses across calls: the encoder's
padding mask, every decoder layer's cross-attention K/V, the self-attention KV cache [batch, heads,
max_len, head_dim] and the decoder position. `start` encodes a request into them; `step` writes the new
token's K/V at the position, attends, and advances the position in place: fixed shapes, fixed
addresses, no host sync. So the decode loop's CUDA graphs are kept in `decode_graphs` and replayed by
later calls. The engine shares the HF model's weights.

`start_and_first_step` (what `generate_t5` runs) does `start` and the decoder start token's step on input
buffers kept per (batch, source length rounded up to 64), the source padded on the right with masked
positions; on CUDA as one CUDA graph per bucket (`start_graphs`), kept like the decode graphs.

The buffers grow only, to the largest batch, encoder length and decoder length seen, both lengths
rounded up to LENGTH_MULTIPLE: a step attends over the whole buffers (masked past the request's
lengths), so its shapes, and with them Triton's specializations of the kernels' integer arguments
(divisible by 16 or not), do not change with max_new_tokens or the prompt length.

Decoder self-attention runs `ops.attention` (q_len 1) over the whole cache with the step's relative
position bias row and a key-padding mask `key position <= decoder position`, both built on the device.
The attention kernel reads the mask's first and last attended key, so each step only loops over the
keys written so far. (`ops.decode_attention` takes no additive bias, which T5's decoder needs.)
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from tritonize.generation.decoder import parameter_addresses
from tritonize.generation.loop import DecodeGraphCache, PromptGraphCache, decode_loop, round_up
from tritonize.generation.settings import HF_ACTIVATIONS, check_generation_config, resolve_settings
from tritonize.ops import attention, linear, rms_norm

ENGINE_ATTRIBUTE = "_tritonize_t5"
LENGTH_MULTIPLE = 64  # the encoder and decoder buffers grow in steps of this many positions


def check_model(model: torch.nn.Module) -> None:
    """Raises if tritonize's T5 engine cannot run `model` (an HF T5ForConditionalGeneration)."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "t5" or not hasattr(model, "lm_head"):
        raise TypeError(f"expected a transformers T5ForConditionalGeneration, got {type(model).__name__}")
    dtype = model.shared.weight.dtype
    if dtype == torch.float16:
        raise TypeError("T5 overflows in float16 (its feed-forward activations exceed 65504); load the model "
                        "in bfloat16 (torch_dtype=torch.bfloat16) or float32")
    if dtype not in (torch.bfloat16, torch.float32):
        raise TypeError(f"T5 weights must be bfloat16 or float32, got {dtype}")
    if config.dense_act_fn not in HF_ACTIVATIONS:
        raise ValueError(f"unsupported T5 feed-forward activation {config.dense_act_fn!r}; "
                         f"supported: {sorted(HF_ACTIVATIONS)}")


class T5Engine:
    """The encoder, and decoder steps on buffers kept across requests, of an HF T5ForConditionalGeneration.

    Per request: `start(input_ids, attention_mask, max_new_tokens)`, then `step(tokens)` once per decoder
    token (the decoder start token first).
    """

    def __init__(self, model: torch.nn.Module):
        check_model(model)
        config = model.config
        self.model = model
        self.heads, self.head_dim, self.eps = config.num_heads, config.d_kv, config.layer_norm_epsilon
        self.activation = HF_ACTIVATIONS[config.dense_act_fn]
        self.gated = config.is_gated_act
        self.dtype = model.shared.weight.dtype
        # HF keeps the feed-forward output projections ("wo") in fp32 when loading in bf16, which makes the
        # residual stream fp32 from the first feed-forward on; keep it in that dtype throughout.
        wo_dtype = model.encoder.block[0].layer[-1].DenseReluDense.wo.weight.dtype
        self.residual_dtype = torch.promote_types(self.dtype, wo_dtype)
        # T5 v1.0 rescales the decoder output before the tied lm_head; v1.1 / flan do not
        # (transformers 5 keeps that flag in scale_decoder_outputs and forces tie_word_embeddings to True)
        scaled = getattr(config, "scale_decoder_outputs", config.tie_word_embeddings)
        self.output_scale = config.d_model**-0.5 if scaled else None
        self.device = model.shared.weight.device
        self.weight_addresses = parameter_addresses(model)
        self.cache_batch = self.source_len = self.cache_len = 0  # what the buffers hold
        self.position = torch.zeros(1, dtype=torch.long, device=self.device)  # where the next token's K/V go
        self.decode_graphs = DecodeGraphCache()  # the decode loops captured over this engine's buffers
        # start_and_first_step's input buffers and CUDA graphs, per (batch, source bucket length)
        self.start_graphs = PromptGraphCache(self._encode_and_step, self.decode_graphs)

    def is_current(self) -> bool:
        """False once any model parameter was replaced or moved (model.to(...), a new nn.Parameter): rebuild."""
        return parameter_addresses(self.model) == self.weight_addresses

    def reserve(self, batch: int, source_len: int, max_new_tokens: int) -> None:
        """Buffers for at least `batch` requests of `source_len` encoder tokens and `max_new_tokens` new tokens
        (after the decoder start token); grows only. Growing reallocates every buffer a step reads, so the
        captured decode and start graphs are dropped."""
        wanted = (batch, round_up(source_len, LENGTH_MULTIPLE), round_up(max_new_tokens + 1, LENGTH_MULTIPLE))
        held = (self.cache_batch, self.source_len, self.cache_len)
        if all(w <= h for w, h in zip(wanted, held, strict=True)):
            return
        self.decode_graphs.clear()
        self.start_graphs.clear()
        self.cache_batch, self.source_len, self.cache_len = (max(w, h) for w, h in zip(wanted, held, strict=True))
        decoder, device = self.model.decoder, self.device

        def zeros(length: int) -> torch.Tensor:
            return torch.zeros((self.cache_batch, self.heads, length, self.head_dim), dtype=self.dtype, device=device)

        self.encoder_mask = torch.zeros((self.cache_batch, self.source_len), dtype=torch.bool, device=device)
        self.cross_kv = [(zeros(self.source_len), zeros(self.source_len)) for _ in decoder.block]
        self.self_kv = [(zeros(self.cache_len), zeros(self.cache_len)) for _ in decoder.block]
        # the decoder's causal relative position bias by distance (query - key) in [0, cache_len): [heads, cache_len]
        position_bias = decoder.block[0].layer[0].SelfAttention
        buckets = position_bias._relative_position_bucket(
            -torch.arange(self.cache_len, device=device), bidirectional=False,
            num_buckets=position_bias.relative_attention_num_buckets,
            max_distance=position_bias.relative_attention_max_distance)
        self.bias_by_distance = position_bias.relative_attention_bias(buckets).T
        self.key_positions = torch.arange(self.cache_len, device=device)

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int) -> None:
        """Encodes a request into the buffers (grown if needed) and moves the decoder to position 0.

        input_ids: int64 [batch, src_len]; attention_mask: [batch, src_len], nonzero = real token (None: all
        real); max_new_tokens: decoder positions to hold after the decoder start token.
        """
        self._check_request(input_ids, attention_mask)
        batch, source_len = input_ids.shape
        self.reserve(batch, source_len, max_new_tokens)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self._encode_request(input_ids, attention_mask.to(device=self.device, dtype=torch.bool))

    def start_and_first_step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                             max_new_tokens: int, start_token: int, *, cuda_graph: bool = True) -> torch.Tensor:
        """`start`, then `step` of the decoder start token (start_token) for every row: returns the first
        logits [batch, vocab]. Runs on the input buffers of the request's bucket: the source padded on the
        right, with masked positions, to its length rounded up to 64. On CUDA with cuda_graph the bucket's
        CUDA graph replays (captured on its first use); otherwise the same work runs eagerly on the buffers.
        Logits from a graph are its output buffer, which the engine's next graph replay (this or a decode
        step) may overwrite: clone them to keep them.
        """
        self._check_request(input_ids, attention_mask)
        batch, source_len = input_ids.shape
        self.reserve(batch, source_len, max_new_tokens)
        padded_len = round_up(source_len, LENGTH_MULTIPLE)

        def allocate_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return (torch.zeros((batch, padded_len), dtype=torch.long, device=self.device),
                    torch.zeros((batch, padded_len), dtype=torch.bool, device=self.device),
                    torch.zeros(batch, dtype=torch.long, device=self.device))

        def fill_inputs(ids: torch.Tensor, mask: torch.Tensor, start_tokens: torch.Tensor) -> None:
            ids[:, :source_len].copy_(input_ids)
            ids[:, source_len:].zero_()
            if attention_mask is None:
                mask[:, :source_len].fill_(True)
            else:
                mask[:, :source_len].copy_(attention_mask)  # nonzero -> True
            mask[:, source_len:].fill_(False)
            start_tokens.fill_(start_token)

        graphed = cuda_graph and self.device.type == "cuda"
        return self.start_graphs.run((batch, padded_len), allocate_inputs, fill_inputs, graphed)

    def _check_request(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        if input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError(f"input_ids must be int64 [batch, seq_len], got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
        if input_ids.device != self.device:
            raise ValueError(f"input_ids is on {input_ids.device} but the model is on {self.device}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")

    def _encode_request(self, input_ids: torch.Tensor, mask: torch.Tensor) -> None:
        """The device work of `start`: the encoder, the cross-attention K/V and the encoder mask into the
        buffers, the decoder position to 0. mask: bool [batch, src_len], True = real token."""
        batch, source_len = input_ids.shape
        encoder_states = self.encode(input_ids, mask).to(self.dtype)
        self.encoder_mask[:batch].zero_()  # positions past this request's source stay masked
        self.encoder_mask[:batch, :source_len] = mask
        for (k_buffer, v_buffer), block in zip(self.cross_kv, self.model.decoder.block, strict=True):
            cross_attention = block.layer[1].EncDecAttention
            for buffer, projection in ((k_buffer, cross_attention.k), (v_buffer, cross_attention.v)):
                buffer[:batch, :, :source_len] = self._split_heads(linear(encoder_states, projection.weight))
        self.position.zero_()

    def _encode_and_step(self, input_ids: torch.Tensor, mask: torch.Tensor, start_tokens: torch.Tensor
                         ) -> torch.Tensor:
        self._encode_request(input_ids, mask)
        return self.step(start_tokens)

    def encode(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The encoder's last hidden state [batch, src_len, d_model] (after its final norm); mask: bool
        [batch, src_len], True = real token."""
        encoder = self.model.encoder
        src_len = input_ids.shape[1]
        bias = encoder.block[0].layer[0].SelfAttention.compute_bias(src_len, src_len, input_ids.device)
        hidden = F.embedding(input_ids, encoder.embed_tokens.weight)
        self_attention = functools.partial(self._encoder_self_attention, mask=mask, bias=bias)
        return self._run_stack(encoder, hidden, (self_attention, self._feed_forward))

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Appends tokens (int64 [batch]) at the decoder position; returns the next logits [batch, vocab].

        Reads and writes rows [:batch] of the buffers, whose batch must be the request's (`start`).
        """
        decoder = self.model.decoder
        batch = tokens.shape[0]
        hidden = F.embedding(tokens[:, None], decoder.embed_tokens.weight)
        seen_keys = (self.key_positions <= self.position).expand(batch, -1)
        distances = (self.position - self.key_positions).clamp(min=0)  # keys past the position are masked
        bias = self.bias_by_distance.index_select(1, distances)[None, :, None, :]  # [1, heads, 1, cache_len]
        self_attention = functools.partial(self._decoder_self_attention, seen_keys=seen_keys, bias=bias)
        cross_attention = functools.partial(self._cross_attention, encoder_mask=self.encoder_mask[:batch])
        hidden = self._run_stack(decoder, hidden, (self_attention, cross_attention, self._feed_forward))
        self.position += 1
        hidden = hidden.to(self.dtype)
        if self.output_scale is not None:
            hidden = hidden * self.output_scale
        return linear(hidden[:, 0], self.model.lm_head.weight)

    # -- blocks -------------------------------------------------------------------------------------

    def _run_stack(self, stack, hidden: torch.Tensor, sublayers) -> torch.Tensor:
        """hidden += sublayer(norm(hidden)) for each sublayer of each block, then the final norm.

        Each residual add is fused into the next norm. sublayers[i](block_index, block.layer[i], normed).
        """
        hidden = hidden.to(self.residual_dtype)
        update = None
        for index, block in enumerate(stack.block):
            for layer, sublayer in zip(block.layer, sublayers, strict=True):
                normed, hidden = self._add_and_norm(layer.layer_norm, hidden, update)
                update = sublayer(index, layer, normed.to(self.dtype))
        return self._add_and_norm(stack.final_layer_norm, hidden, update)[0]

    def _add_and_norm(self, layer_norm, hidden, update):
        """(norm(hidden + update), hidden + update), update None meaning nothing to add."""
        if update is None:
            return rms_norm(hidden, layer_norm.weight, self.eps, variant="t5"), hidden
        return rms_norm(update.to(hidden.dtype), layer_norm.weight, self.eps, residual=hidden, variant="t5")

    def _encoder_self_attention(self, _, layer, x, *, mask, bias):
        module = layer.SelfAttention
        q, k, v = (self._split_heads(linear(x, p.weight)) for p in (module.q, module.k, module.v))
        out = attention(q, k, v, scale=1.0, key_padding_mask=mask, bias=bias, seq_major=True)
        return linear(self._merge_heads(out), module.o.weight)

    def _decoder_self_attention(self, index, layer, x, *, seen_keys, bias):
        module = layer.SelfAttention
        q, k, v = (self._split_heads(linear(x, p.weight)) for p in (module.q, module.k, module.v))
        k_cache, v_cache = (cache[: x.shape[0]] for cache in self.self_kv[index])
        k_cache.index_copy_(2, self.position, k)
        v_cache.index_copy_(2, self.position, v)
        out = attention(q, k_cache, v_cache, scale=1.0, key_padding_mask=seen_keys, bias=bias, seq_major=True)
        return linear(self._merge_heads(out), module.o.weight)

    def _cross_attention(self, index, layer, x, *, encoder_mask):
        module = layer.EncDecAttention
        k, v = (kv[: x.shape[0]] for kv in self.cross_kv[index])
        out = attention(self._split_heads(linear(x, module.q.weight)), k, v, scale=1.0,
                        key_padding_mask=encoder_mask, seq_major=True)
        return linear(self._merge_heads(out), module.o.weight)

    def _feed_forward(self, _, layer, x):
        dense = layer.DenseReluDense
        if self.gated:
            hidden = linear(x, dense.wi_0.weight, activation=self.activation) * linear(x, dense.wi_1.weight)
        else:
            hidden = linear(x, dense.wi.weight, activation=self.activation)
        return linear(hidden.to(dense.wo.weight.dtype), dense.wo.weight)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:  # [batch, seq, heads * d] -> [batch, heads, seq, d]
        return x.view(*x.shape[:2], self.heads, self.head_dim).transpose(1, 2)

    def _merge_heads(self, x: torch.Tensor) -> torch.Tensor:  # [batch, seq, heads, d] -> [batch, seq, heads * d]
        return x.reshape(x.shape[0], x.shape[1], self.heads * self.head_dim)


def cached_engine(model: torch.nn.Module) -> T5Engine:
    """The engine kept on the model, rebuilt (with no graphs) when a parameter was replaced or moved."""
    engine = getattr(model, ENGINE_ATTRIBUTE, None)
    if engine is None or not engine.is_current():
        engine = T5Engine(model)
        setattr(model, ENGINE_ATTRIBUTE, engine)
    return engine


# the engine's caches, buffers and graphs outlive the call: made outside inference mode even when the caller
# is in it, so a later call outside it may still write them (inference tensors refuse in-place writes there)
@torch.inference_mode(False)
def generate_t5(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    do_sample: bool = False,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    cuda_graph: bool = True,
) -> torch.Tensor:
    """HF `model.generate(input_ids, attention_mask, ...)` for T5: int64 [batch, 1 + n_new], the decoder
    start token first, then the new tokens, pad after each sequence's eos.

    Arguments as in `tritonize.generate` (None: model.generation_config's value; eos_token_id=[]: no eos).
    attention_mask: 1 = real token, padding anywhere.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if attention_mask is not None and not attention_mask.any(dim=1).all():
        raise ValueError("every row of attention_mask needs at least one real token (a 1)")
    check_model(model)
    check_generation_config(model)
    settings = resolve_settings(model, eos_token_id, pad_token_id, temperature, top_k, top_p)
    start_token = model.generation_config.decoder_start_token_id
    start_token = model.config.decoder_start_token_id if start_token is None else start_token
    with torch.no_grad():
        engine = cached_engine(model)
        first_logits = engine.start_and_first_step(input_ids, attention_mask, max_new_tokens, start_token,
                                                   cuda_graph=cuda_graph)
        new_tokens = decode_loop(engine.step, first_logits, max_new_tokens=max_new_tokens,
                                 min_new_tokens=min_new_tokens, do_sample=do_sample, generator=generator,
                                 cuda_graph=cuda_graph, graph_cache=engine.decode_graphs, **settings)
    return F.pad(new_tokens, (1, 0), value=start_token)  # the decoder start token first, as HF returns it
