"""Fast generation: static KV caches, a decode loop captured in CUDA graphs, token selection on the device."""

from tritonize.generation.api import generate
from tritonize.generation.decoder import SUPPORTED_MODEL_TYPES, DecoderEngine
from tritonize.generation.loop import decode_loop
from tritonize.generation.sampling import filter_logits, select_tokens

__all__ = ["generate", "decode_loop", "DecoderEngine", "SUPPORTED_MODEL_TYPES", "filter_logits", "select_tokens"]
