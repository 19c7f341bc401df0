"""Generation benchmark (`tritonize bench-generate`): tritonize.generate against HF generate, one process.

Models from ANCHORS.md with random weights in bf16: the Llama-style 1.7 GB decoder (prompt 128, 256 new
tokens, batch 1 and 8) and T5-base (128 input tokens, 64 new, batch 1 and 8). Per engine: decode
tokens/s (from the difference of a 256- and a 32-token run), the whole call's time, time to first token
against one HF forward over the prompts, the fraction of the memory roofline (weights + KV cache bytes
per step over the measured copy bandwidth), first-call seconds and greedy agreement with HF. tritonize's
times are medians of 3 runs; HF's runs take seconds each and are timed once.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
from collections.abc import Callable

import torch
import triton.testing

from tritonize import tuning
from tritonize.bench.kernels import measure_ceilings
from tritonize.bench.report import Row

LLAMA_1_7GB = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                   num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096)
T5_BASE = dict(d_model=768, d_ff=3072, num_layers=12, num_heads=12, d_kv=64, vocab_size=32128,
               decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


SHORT_RUN = 32  # new tokens of the run whose time is subtracted from the full run's
REPEATS = 3  # timed runs of tritonize per measurement (median); HF's runs take seconds each: one


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


def _prefill_forward_s(model, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """Median seconds of one HF forward over the prompts (T5: the encoder and the first decoder position),
    the "one prefill forward" that time to first token is compared with."""
    kwargs = dict(input_ids=ids, attention_mask=mask, use_cache=False)
    if model.config.is_encoder_decoder:
        kwargs["decoder_input_ids"] = torch.full((ids.shape[0], 1), model.config.decoder_start_token_id,
                                                 device=ids.device)
    with torch.inference_mode():
        return triton.testing.do_bench(lambda: model(**kwargs), warmup=3, rep=50, return_mode="median") / 1e3


def bench_model(name: str, model, batches, prompt_len: int, new_tokens: int,
                bytes_per_step: Callable[[int, int], float], copy_bytes_per_s: float,
                engines_wanted=None, progress=print, tune: bool = False) -> tuple[list[Row], dict]:
    rows, extra = [], {}
    engines = {k: v for k, v in _engines(model).items() if engines_wanted is None or k in engines_wanted}
    for batch in batches:
        ids = torch.randint(2, model.config.vocab_size - 1, (batch, prompt_len), device="cuda")
        mask = torch.ones_like(ids)
        reference_tokens = None
        prefill_forward_s = _prefill_forward_s(model, ids, mask)
        for engine, generate in engines.items():
            if engine == "hf-generate-static-cache" and batch > 1:
                continue  # slower than the dynamic cache at batch 1 already (ANCHORS.md); saves GPU minutes
            tuning_context = tuning.autotuning() if tune and engine == "tritonize" else contextlib.nullcontext()
            with torch.inference_mode():
                with tuning_context:  # --tune: the first call times kernel configs for each new linear shape
                    warmup_s, _ = _seconds(functools.partial(generate, ids, mask, 8))
                if engine == "hf-generate-static-cache":  # compiles anew for each cache length: once per length
                    for n in (1, SHORT_RUN, new_tokens):
                        generate(ids, mask, n)
                repeats = REPEATS if engine == "tritonize" else 1
                first_s, short_s = (
                    statistics.median(_seconds(functools.partial(generate, ids, mask, n))[0] for _ in range(repeats))
                    for n in (1, SHORT_RUN))
                totals = [_seconds(functools.partial(generate, ids, mask, new_tokens)) for _ in range(repeats)]
                total_s, out = statistics.median(seconds for seconds, _ in totals), totals[-1][1]
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
            extra[f"{shape} {engine}"] = {
                "time_to_first_token_ms": first_s * 1e3, "hf_prefill_forward_ms": prefill_forward_s * 1e3,
                "first_token_over_prefill_forward": first_s / prefill_forward_s, "step_ms": step_s * 1e3,
                "tokens_per_s": batch / step_s, "whole_call_ms": total_s * 1e3, "greedy_agreement_with_hf": agree}
            progress(f"  {shape} {engine:26s} {batch / step_s:9.1f} tokens/s  step {step_s * 1e3:7.3f} ms  "
                     f"whole call {total_s * 1e3:7.1f} ms  first token {first_s * 1e3:6.1f} ms "
                     f"({first_s / prefill_forward_s:4.2f}x an HF prefill forward)  roofline {roofline / step_s:5.2f}  "
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
