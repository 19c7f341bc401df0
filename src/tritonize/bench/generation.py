"""Generation benchmark (`tritonize bench-generate`): tritonize.generate against HF generate, one process.

Models from ANCHORS.md with random weights in bf16: the Llama-style 1.7 GB decoder (prompt 128, 256 new
tokens, batch 1 and 8) and T5-base (128 input tokens, 64 new, batch 1 and 8). Per engine: decode
tokens/s, time to first token, the fraction of the memory roofline (weights + KV cache bytes per step
over the measured copy bandwidth), first-call seconds and greedy agreement with HF.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable

import torch

from tritonize import tuning
from tritonize.bench.kernels import measure_ceilings
from tritonize.bench.report import Row

LLAMA_1_7GB = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                   num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096)
T5_BASE = dict(d_model=768, d_ff=3072, num_layers=12, num_heads=12, d_kv=64, vocab_size=32128,
               decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


SHORT_RUN = 32  # new tokens of the run whose time is subtracted from the full run's


def _seconds(fn: Callable[[], object]) -> tuple[float, object]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, out


def _engines(model) -> dict[str, Callable[..., torch.Tensor]]:
    import tritonize

    def hf(**cache):
        return lambda ids, mask, n: model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                                   do_sample=False, **cache)

    return {
        "hf-generate-dynamic-cache": hf(),
        "hf-generate-static-cache": hf(cache_implementation="static"),
        "tritonize": lambda ids, mask, n: tritonize.generate(model, ids, mask, max_new_tokens=n, min_new_tokens=n),
    }


def _agreement(tokens: torch.Tensor, reference: torch.Tensor) -> float:
    """Fraction of generated positions where two greedy runs chose the same token."""
    return (tokens == reference).float().mean().item()


def bench_model(name: str, model, batches, prompt_len: int, new_tokens: int,
                bytes_per_step: Callable[[int, int], float], copy_bytes_per_s: float,
                engines_wanted=None, progress=print, tune: bool = False) -> tuple[list[Row], dict]:
    rows, extra = [], {}
    engines = {k: v for k, v in _engines(model).items() if engines_wanted is None or k in engines_wanted}
    for batch in batches:
        ids = torch.randint(2, model.config.vocab_size - 1, (batch, prompt_len), device="cuda")
        mask = torch.ones_like(ids)
        reference_tokens = None
        for engine, generate in engines.items():
            if engine == "hf-generate-static-cache" and batch > 1:
                continue  # slower than the dynamic cache at batch 1 already (ANCHORS.md); saves GPU minutes
            tuning_context = tuning.autotuning() if tune and engine == "tritonize" else contextlib.nullcontext()
            with torch.inference_mode():
                with tuning_context:  # --tune: the first call times kernel configs for each new linear shape
                    warmup_s, _ = _seconds(functools.partial(generate, ids, mask, 8))
                first_s, _ = _seconds(functools.partial(generate, ids, mask, 1))
                short_s, _ = _seconds(functools.partial(generate, ids, mask, SHORT_RUN))
                total_s, out = _seconds(functools.partial(generate, ids, mask, new_tokens))
            # as ANCHORS.md measures decode: the difference of two runs cancels prefill and per-call set-up
            step_s = (total_s - short_s) / (new_tokens - SHORT_RUN)
            roofline = bytes_per_step(batch, prompt_len + new_tokens // 2) / copy_bytes_per_s
            shape = f"{name} b{batch} in{prompt_len} new{new_tokens}"
            rows.append(Row("generate", shape, engine, "bfloat16", total_s * 1e3, 1.0 / step_s,
                            "decode steps/s", roofline / step_s, None, warmup_s))
            tokens = out[:, -new_tokens:]
            if engine == "hf-generate-dynamic-cache":
                reference_tokens = tokens
            agree = None if reference_tokens is None else _agreement(tokens, reference_tokens)
            extra[f"{shape} {engine}"] = {"time_to_first_token_ms": first_s * 1e3, "step_ms": step_s * 1e3,
                                          "tokens_per_s": batch / step_s, "greedy_agreement_with_hf": agree}
            progress(f"  {shape} {engine:26s} {batch / step_s:9.1f} tokens/s  step {step_s * 1e3:7.3f} ms  "
                     f"first token {first_s * 1e3:7.1f} ms  roofline {roofline / step_s:5.2f}  "
                     f"first call {warmup_s:5.1f} s  agreement {agree}")
    return rows, extra


ENGINES = ("hf-generate-dynamic-cache", "hf-generate-static-cache", "tritonize")


def run(models=("llama", "t5"), engines_wanted=None, progress=print, tune: bool = False) -> dict:
    import transformers

    ceilings = measure_ceilings()
    copy_bytes_per_s = ceilings["copy_gb_per_s"] * 1e9
    rows, extra = [], {"ceilings": ceilings}
    torch.manual_seed(0)
    if "llama" in models:
        config = transformers.LlamaConfig(**LLAMA_1_7GB)
        model = transformers.LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        head_dim = config.hidden_size // config.num_attention_heads
        kv_bytes_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 2

        def llama_bytes(batch: int, mean_len: int) -> float:
            return weight_bytes + batch * mean_len * kv_bytes_per_token

        got_rows, got = bench_model("llama-1.7GB", model, (1, 8), 128, 256, llama_bytes, copy_bytes_per_s,
                                    engines_wanted, progress, tune)
        rows += got_rows
        extra.update(got)
        del model
    if "t5" in models:
        config = transformers.T5Config(**T5_BASE)
        model = transformers.T5ForConditionalGeneration(config).to("cuda", torch.bfloat16).eval()
        # a decode step reads the decoder and the output projection (the encoder ran once)
        step_modules = (model.decoder, model.lm_head)
        decoder_bytes = sum(p.numel() * p.element_size() for m in step_modules for p in m.parameters())
        got_rows, got = bench_model("t5-base", model, (1, 8), 128, 64, lambda batch, mean_len: decoder_bytes,
                                    copy_bytes_per_s, engines_wanted, progress, tune)
        rows += got_rows
        extra.update(got)
    return {"rows": rows, **extra}
