"""Generation settings as HF resolves them: arguments left at None come from model.generation_config,
then HF's sampling defaults; config settings HF would apply and tritonize does not are refused. Also
HF's activation names in tritonize's terms."""

from __future__ import annotations

import os

import torch

# Set to 1 to run decode steps of Llama-style models through ops.decoder_layer_chain (one persistent kernel
# for each layer's GEMVs after attention; DecoderEngine.chains_layers). Off by default: the kernel passes its
# CPU tests through the interpreter but has not been timed or run on a GPU yet (docs/generation.md).
DECODE_LAYER_CHAIN_ENV = "TRITONIZE_DECODE_LAYER_CHAIN"


def decode_layer_chain_enabled() -> bool:
    return os.environ.get(DECODE_LAYER_CHAIN_ENV, "0").strip().lower() in ("1", "true", "yes", "on")

# HF activation names (hidden_act, activation_function, dense_act_fn) -> tritonize.ops activations
HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                  "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu", "tanh": "tanh"}
# Sampling settings HF takes from the generation config when an argument is None, and HF's own defaults.
HF_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}
# generation_config fields HF would apply and tritonize does not, with the value that means "off".
UNSUPPORTED_SETTINGS = {
    "num_beams": 1, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_length": 0, "min_p": None,
    "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "top_h": None, "bad_words_ids": None,
    "suppress_tokens": None, "begin_suppress_tokens": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "sequence_bias": None, "encoder_repetition_penalty": 1.0,
    "exponential_decay_length_penalty": None, "max_time": None, "stop_strings": None,
}


def check_generation_config(model: torch.nn.Module) -> None:
    """Raises ValueError naming a generation_config setting that HF would apply and tritonize does not."""
    config = getattr(model, "generation_config", None)
    for name, off in UNSUPPORTED_SETTINGS.items():
        value = getattr(config, name, None)
        if value is not None and value != off:
            raise ValueError(f"model.generation_config.{name} = {value!r}: HF generate would apply it and "
                             f"tritonize.generate does not; set it to {off!r} to generate without it")


def resolve_settings(model: torch.nn.Module, eos_token_id, pad_token_id, temperature, top_k, top_p) -> dict:
    """decode_loop's eos_token_id, pad_token_id, temperature, top_k and top_p: each argument left at None
    from model.generation_config, then (sampling) HF's defaults, as HF does."""
    config = model.generation_config
    settings = {"eos_token_id": config.eos_token_id if eos_token_id is None else eos_token_id,
                "pad_token_id": config.pad_token_id if pad_token_id is None else pad_token_id}
    for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p)):
        settings[name] = next(v for v in (value, getattr(config, name, None), HF_SAMPLING_DEFAULTS[name])
                              if v is not None)
    return settings
