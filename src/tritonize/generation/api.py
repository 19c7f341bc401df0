"""tritonize.generate(): HF `model.generate` for decoder-only models, on a static cache and CUDA graphs."""

from __future__ import annotations

import torch

from tritonize.generation.decoder import SUPPORTED_MODEL_TYPES, DecoderEngine
from tritonize.generation.loop import bucket_length, decode_loop
from tritonize.generation.settings import check_generation_config, resolve_settings
from tritonize.generation.t5 import generate_t5

ENGINE_ATTRIBUTE = "_tritonize_decoder"


def _engine(model: torch.nn.Module) -> DecoderEngine:
    """The engine cached on the model (a tensor-parallel one too), rebuilt alike when parameters were replaced."""
    engine = getattr(model, ENGINE_ATTRIBUTE, None)
    if engine is None or not engine.is_current():
        engine = DecoderEngine(model) if engine is None else engine.rebuilt()
        runner = getattr(model, "_tritonize_runner", None)
        if runner is not None:  # optimize_model's CUDA graphs recorded the weights' old addresses
            runner.forget_graphs()
        setattr(model, ENGINE_ATTRIBUTE, engine)
    return engine


def check_causal_lm(model: object) -> torch.nn.Module:
    """The model, after checking that the decoder-only engine can run it (ValueError / TypeError naming why not)."""
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"tritonize.generate takes an HF causal LM, got {type(model).__name__}")
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES or getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"tritonize.generate does not support model type {model_type!r} ({type(model).__name__}); "
                         f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}, t5")
    if not isinstance(getattr(model, "lm_head", None), torch.nn.Linear):
        raise ValueError(f"{type(model).__name__} has no lm_head: pass the *ForCausalLM model, not the base model")
    if model.training:
        raise ValueError("tritonize.generate runs inference: call model.eval() first")
    check_generation_config(model)
    return model


def _same_generator_on_every_rank(engine: DecoderEngine, generator: torch.Generator | None) -> None:
    """Tensor parallel sampling: every rank takes rank 0's generator state, so all ranks draw the same tokens."""
    if generator is None:  # the device's default generator, which sampling then uses
        device = engine.device
        generator = (torch.cuda.default_generators[device.index if device.index is not None
                                                   else torch.cuda.current_device()]
                     if device.type == "cuda" else torch.default_generator)
    state = generator.get_state().to(engine.device)  # NCCL sends CUDA tensors only
    torch.distributed.broadcast(state, group_src=0, group=engine.process_group)
    generator.set_state(state.cpu())


# the engine's caches, buffers and graphs outlive the call: made outside inference mode even when the caller
# is in it, so a later call outside it may still write them (inference tensors refuse in-place writes there)
@torch.inference_mode(False)
def generate(
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
    """HF `model.generate(input_ids, attention_mask, ...)` for decoder-only models: [batch, prompt_len + n_new].

    model: an HF Llama, Mistral, Qwen2, Qwen3 or GPT-2 causal LM (also after `tritonize.optimize_model`).
    attention_mask: 1 = real token; padding may sit on either side (or anywhere): each row continues its
    own real tokens, so a left-padded batch gives HF's tokens, and a right-padded row gets the tokens HF
    gives that row left-padded (HF itself mis-positions right padding). The prompt is returned as given.
    Greedy by default; do_sample draws from temperature -> top-k -> top-p filtered logits as HF does.
    temperature, top_k, top_p, eos_token_id, pad_token_id: None takes model.generation_config's value,
    as HF does (for sampling, HF's defaults after that: temperature 1, top_k 50, top_p 1); eos_token_id=[]
    generates without an eos (HF: an explicit eos_token_id=None). generator seeds sampling.
    cuda_graph: run the prefill and each decode step from CUDA graphs (CUDA only), kept on the model's
    engine for later calls: the prefill's per batch and prompt length rounded up to 64, the decode
    loop's per batch and settings.
    T5 (T5ForConditionalGeneration) goes to `generation.t5.generate_t5`: [batch, 1 + n_new], the
    decoder start token first, as HF returns it.
    """
    if getattr(getattr(model, "config", None), "model_type", None) == "t5":
        return generate_t5(model, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                           min_new_tokens=min_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
                           top_p=top_p, eos_token_id=eos_token_id, pad_token_id=pad_token_id, generator=generator,
                           cuda_graph=cuda_graph)
    model = check_causal_lm(model)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError("input_ids must be an int64 tensor [batch, prompt_len], got "
                         f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} "
                         f"{tuple(getattr(input_ids, 'shape', ()))}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must hold at least one token per row, got shape {tuple(input_ids.shape)}")
    engine = _engine(model)
    device = engine.device
    if input_ids.device != device:
        raise ValueError(f"input_ids is on {input_ids.device} but the model (its generation engine) is on {device}")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape or attention_mask.device != device:
            raise ValueError(f"attention_mask must match input_ids' shape {tuple(input_ids.shape)} and device "
                             f"{device}, got {tuple(attention_mask.shape)} on {attention_mask.device}")
        if not attention_mask.any(dim=1).all():
            raise ValueError("every row of attention_mask needs at least one real token (a 1)")
    settings = resolve_settings(model, eos_token_id, pad_token_id, temperature, top_k, top_p)
    if do_sample and engine.tp_size > 1:
        _same_generator_on_every_rank(engine, generator)
    batch, prompt_len = input_ids.shape
    with torch.no_grad():
        engine.reserve(batch, prompt_len + max_new_tokens, padding=bucket_length(prompt_len) - prompt_len)
        # the prompts left-aligned and padded to their bucket; from a kept CUDA graph on CUDA
        first_logits = engine.prefill_bucketed(input_ids, attention_mask, cuda_graph=cuda_graph)
        new_tokens = decode_loop(engine.step, first_logits, max_new_tokens=max_new_tokens,
                                 min_new_tokens=min_new_tokens, do_sample=do_sample, cuda_graph=cuda_graph,
                                 generator=generator, graph_cache=engine.decode_graphs, **settings)
    return torch.cat([input_ids, new_tokens], dim=1)
