"""Tensor-parallel generation throughput: `torchrun --nproc-per-node N benchmarks/tp_generate.py --out DIR`.

An 8B-like Llama (hidden 4096, 32 layers, 32 heads / 8 KV heads, intermediate 14336, vocab 128256, bf16,
random weights) through `tritonize.parallel.tensor_parallel` + `tritonize.generate`: prompt 128, 256 new
tokens, batch 1 and 8; time to first token, decode tokens/s and each rank's peak GPU memory. Run it with
N = 1 for the baseline, then 2 (4, 8). Rank 0 writes DIR/tp-generate-<config>-world<N>-<all-reduce>.json.

Every rank makes the whole random model on its own GPU (16 GB, seconds) and the engine takes its shards
(the HF model stays whole beside them: memory is not what this measures). `--tiny` runs a tiny fp32
config instead (CPU and gloo work: a smoke test of the script, not a measurement).
"""

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
import triton
from profile_model import kernel_times

import tritonize
from tritonize import parallel
from tritonize.bench.generation import LLAMA_1_7GB, SHORT_RUN
from tritonize.generation.api import ENGINE_ATTRIBUTE
from tritonize.generation.collectives import ALL_REDUCE_METHODS

CONFIGS = {
    "llama-1.7gb": LLAMA_1_7GB,
    "llama-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=97, max_position_embeddings=256),
}


def random_llama(name: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """The same random model on every rank (seed 0), made directly on `device` in `dtype`: on a GPU in seconds,
    where a CPU initialisation of 8B parameters takes minutes. Every rank draws the same numbers (same seed,
    same kind of device); `tensor_parallel` checks it."""
    config = transformers.LlamaConfig(**CONFIGS[name])
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config).to(dtype)
    model.to_empty(device=device)
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.02, generator=generator)
            else:  # norm weights
                param.fill_(1.0)
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config).to(device)
    model.model.rotary_emb = rotary  # its buffers, which to_empty left uninitialised
    return model.eval()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


def seconds(call, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    call()
    synchronize(device)
    return time.perf_counter() - start


def measure(model, device, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    vocab = model.config.vocab_size
    ids = torch.randint(vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(batch)).to(device)
    mask = torch.ones_like(ids)

    def generate(n: int) -> None:
        out = tritonize.generate(model, ids, mask, max_new_tokens=n, eos_token_id=[])
        assert out.shape[1] == prompt_len + n

    generate(new_tokens)  # warm-up: Triton compiles, caches allocated
    short_tokens = min(SHORT_RUN, new_tokens // 2)
    first, short, whole = (statistics.median(seconds(lambda n=n: generate(n), device) for _ in range(repeats))
                           for n in (1, short_tokens, new_tokens))
    # decode rate from the difference of two runs: prefill and per-call set-up cancel out
    step = (whole - short) / (new_tokens - short_tokens)
    if step <= 0:
        raise RuntimeError(f"batch {batch}: {new_tokens} new tokens took {whole * 1e3:.2f} ms, no longer than "
                           f"{short_tokens} ({short * 1e3:.2f} ms): timing noise exceeds the decode steps; "
                           "raise --new-tokens or --repeats")
    return dict(batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, time_to_first_token_ms=first * 1e3,
                generate_s=whole, step_ms=step * 1e3, decode_tokens_per_s=batch / step,
                end_to_end_tokens_per_s=batch * new_tokens / whole)


def sum_error(engine, device) -> float | None:
    """Largest relative difference between the engine's sum over ranks (symmetric memory by default) and an
    fp32 torch.distributed.all_reduce of the same random decode-step tensors; None on one rank."""
    if engine.collectives is None:
        return None
    worst = 0.0
    generator = torch.Generator(device).manual_seed(dist.get_rank())
    for batch in (1, 3, 8, 64):
        x = torch.randn((batch, 1, engine.config.hidden_size), generator=generator, device=device,
                        dtype=engine.embed.dtype)
        expected = x.to(torch.float32, copy=True)
        dist.all_reduce(expected)
        got = engine.collectives.sum(x.clone()).float()
        worst = max(worst, ((got - expected).abs().max() / expected.abs().max()).item())
    return worst


def profile_step(model, device, batch: int, prompt_len: int) -> dict[str, float]:
    """GPU microseconds per kernel name of one eager decode step (this rank), after a prefill (CPU: ops' times)."""
    engine = getattr(model, ENGINE_ATTRIBUTE)
    ids = torch.randint(model.config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)  # the same prompts on every rank
    engine.reserve(batch, prompt_len + 8)
    with torch.no_grad():
        engine.prefill(ids, torch.ones_like(ids, dtype=torch.bool))
        tokens, seqlens = ids[:, -1].clone(), engine.cache_seqlens.clone()

        def step() -> None:
            engine.cache_seqlens.copy_(seqlens)  # stay at one position: every call does the same work
            engine.step(tokens)

        step()
        return kernel_times(step, steps=10, device=device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON results (rank 0 writes)")
    parser.add_argument("--tiny", action="store_true", help="tiny fp32 config: a smoke test, on CPU too")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=None, help="default 128 (tiny: 8)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 256 (tiny: 16)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    parser.add_argument("--profile", action="store_true", help="also GPU time per kernel of one decode step")
    parser.add_argument("--all-reduce", default="auto", choices=ALL_REDUCE_METHODS,
                        help="how ranks sum activations (tritonize.parallel.tensor_parallel's all_reduce)")
    args = parser.parse_args()
    if args.new_tokens is not None and args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2: the decode rate is the difference of two runs")
    name = "tiny" if args.tiny else "llama-8b"
    prompt_len = args.prompt_len or (8 if args.tiny else 128)
    new_tokens = args.new_tokens or (16 if args.tiny else 256)

    rank, world_size = parallel.init_from_torchrun()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model = random_llama(name, torch.float32 if args.tiny else torch.bfloat16, device)
    parallel.tensor_parallel(model, device=device, all_reduce=args.all_reduce)
    engine = getattr(model, ENGINE_ATTRIBUTE)
    sum_check = sum_error(engine, device)
    if rank == 0:
        print(f"sums through {engine.collectives.method if engine.collectives else None}: largest relative "
              f"difference to an fp32 all_reduce {sum_check}", flush=True)
    rows = []
    for batch in args.batches:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        row = measure(model, device, batch, prompt_len, new_tokens, args.repeats)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        peaks = [None] * world_size
        dist.all_gather_object(peaks, peak)
        row["peak_memory_gib_per_rank"] = peaks
        if args.profile:
            row["step_kernels_us"] = profile_step(model, device, batch, prompt_len)
        rows.append(row)
        if rank == 0:
            print(f"world {world_size} batch {batch}: {row['decode_tokens_per_s']:.1f} tokens/s "
                  f"(step {row['step_ms']:.3f} ms; end to end {row['end_to_end_tokens_per_s']:.1f} tokens/s), "
                  f"first token {row['time_to_first_token_ms']:.1f} ms, peak GiB per rank {peaks}", flush=True)
            if args.profile:
                kernels = row["step_kernels_us"]
                print(f"  eager step: {sum(kernels.values()):.1f} us of GPU time on rank 0")
                for kernel, us in list(kernels.items())[:12]:
                    print(f"  {us:8.1f} us  {kernel}")
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        result = dict(
            card=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            world_size=world_size, backend=dist.get_backend(), config=name, model=CONFIGS[name],
            all_reduce=engine.collectives.method if engine.collectives else None,
            vocab_parallel_lm_head=engine.vocab_parallel, sum_max_relative_difference_to_fp32=sum_check,
            dtype="float32" if args.tiny else "bfloat16", torch=torch.__version__, triton=triton.__version__,
            transformers=transformers.__version__,
            nccl=".".join(map(str, torch.cuda.nccl.version())) if device.type == "cuda" else None,
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            command="torchrun --nproc-per-node {} {}".format(world_size, " ".join(sys.argv)), rows=rows,
        )
        path = args.out / f"tp-generate-{name}-world{world_size}-{args.all_reduce}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")
    dist.barrier()
    parallel.release(model)  # the kept CUDA graphs captured the group's collectives: they go first
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
