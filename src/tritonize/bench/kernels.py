"""Kernel micro-benchmarks: tritonize's kernels against PyTorch's (cuBLAS, cuDNN/flash SDPA) on one GPU.

Every engine runs in the same process on the same card. Each is timed the way tritonize runs in
production, replayed from a CUDA graph (so Python launch overhead does not hide the GPU time of small
kernels), cycling over enough copies of the inputs to exceed the L2 cache; the median is kept.
Results carry the distance to the hardware (TFLOP/s against the measured matmul rate, GB/s against
the measured copy bandwidth) and the error against an fp32 reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from tritonize import ops
from tritonize.bench.report import Row
from tritonize.kernels import reference
from tritonize.kernels.attention import AttentionConfig, flash_attention_fwd
from tritonize.kernels.linear import linear_configs, linear_fwd

SDPA_BACKENDS = ("cudnn", "flash", "efficient", "math")


L2_BYTES = 50 * 2**20  # H100: 50 MiB
REPLAY_TARGET_MS = 2.0


def median_ms(fn: Callable[[], object]) -> float:
    """Median of `do_bench` (eager launches): for large kernels and the one-off ceiling measurements."""
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def copies_beyond_l2(nbytes: int) -> int:
    """How many copies of an input of nbytes make one pass over them stream from memory, not L2."""
    return max(1, min(16, math.ceil(4 * L2_BYTES / max(nbytes, 1))))


def graph_median_ms(fn: Callable[[int], object], copies: int = 1, reps: int = 25) -> float:
    """Median time of one fn(i) call, replayed from a CUDA graph that cycles i over `copies` inputs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(copies):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)

    def capture(rounds: int) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(rounds):
                for i in range(copies):
                    fn(i)
        return graph

    def replay_ms(graph: torch.cuda.CUDAGraph) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    probe = capture(1)
    probe.replay()
    rounds = max(1, min(50, math.ceil(REPLAY_TARGET_MS / max(replay_ms(probe), 1e-3))))
    del probe
    graph = capture(rounds)
    graph.replay()
    times = sorted(replay_ms(graph) for _ in range(reps))
    return times[len(times) // 2] / (rounds * copies)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def measure_ceilings() -> dict[str, float]:
    """Device-to-device copy bandwidth (bytes read + written) and a large fp16 cuBLAS matmul rate."""
    src = torch.randn(2**29, device="cuda", dtype=torch.float16)  # 1 GiB
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    mm_ms = median_ms(lambda: a @ b)
    return {
        "copy_gb_per_s": 2 * 2**30 / copy_ms / 1e6,
        "matmul_fp16_tflop_per_s": 2 * 8192**3 / mm_ms / 1e9,
    }


# -- attention ------------------------------------------------------------------------------------


def _sdpa_context(backend: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }
    return sdpa_kernel([names[backend]])


def attention_cases(quick: bool) -> Iterator[tuple[int, int, int, int, str]]:
    """(head_dim, heads, batch, tokens, mode) with batch x tokens = 16384, as in ANCHORS.md."""
    token_counts = (512, 4096) if quick else (128, 512, 1024, 2048, 4096, 8192, 16384)
    for head_dim, heads in ((64, 32), (128, 16)):
        for tokens in token_counts:
            for mode in ("non-causal", "causal", "padding"):
                yield head_dim, heads, max(1, 16384 // tokens), tokens, mode


def bench_attention(ceilings: dict[str, float], quick: bool = False) -> list[Row]:
    rows = []
    dtype = torch.float16
    for head_dim, heads, batch, tokens, mode in attention_cases(quick):
        q, k, v = (torch.randn(batch, heads, tokens, head_dim, device="cuda", dtype=dtype) for _ in range(3))
        causal = mode == "causal"
        key_padding_mask = sdpa_mask = None
        if mode == "padding":  # each sequence's length drawn in [tokens/2, tokens]
            lengths = torch.randint(tokens // 2, tokens + 1, (batch,), device="cuda")
            key_padding_mask = torch.arange(tokens, device="cuda")[None, :] < lengths[:, None]
            sdpa_mask = key_padding_mask[:, None, None, :]
        flops = 4 * batch * heads * tokens**2 * head_dim * (0.5 if causal else 1.0)
        shape = f"d{head_dim} {tokens}tok b{batch}xh{heads} {mode}"

        def record(engine, fn, error=None, shape=shape, flops=flops):
            ms = graph_median_ms(lambda i, fn=fn: fn())
            tflops = flops / ms / 1e9
            rows.append(Row("attention", shape, engine, "float16", ms, tflops, "TFLOP/s",
                            tflops / ceilings["matmul_fp16_tflop_per_s"], error))

        ours = lambda: ops.attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask)  # noqa: B023
        error = None
        if batch * heads * tokens**2 <= 2**31:
            ref = reference.attention(q.float(), k.float(), v.float(), head_dim**-0.5, causal, key_padding_mask)
            error = relative_error(ours(), ref)
        record("tritonize", ours, error=error)
        for backend in SDPA_BACKENDS:
            if backend == "math" and batch * heads * tokens**2 > 2**30:
                continue  # the math backend materializes the score matrix
            if backend == "flash" and sdpa_mask is not None:
                continue  # flash takes no mask
            fn = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, is_causal=causal)  # noqa: B023
            try:
                with _sdpa_context(backend):
                    fn()
                    record(f"sdpa-{backend}", fn)
            except RuntimeError:
                continue
    return rows


def sweep_attention(ceilings: dict[str, float]) -> list[Row]:
    """Tries block configurations at short and long sequences; used to set `default_config`'s table."""
    configs = [
        AttentionConfig(bm, bn, w, s)
        for bm, bn, w, s in [
            (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 4),
            (64, 64, 4, 3), (64, 128, 4, 3), (128, 32, 4, 3), (128, 128, 4, 3), (64, 64, 4, 2),
        ]
    ]
    rows = []
    for head_dim, heads, tokens in ((64, 32, 512), (64, 32, 4096), (128, 16, 512), (128, 16, 4096)):
        batch = 16384 // tokens
        q, k, v = (torch.randn(batch, heads, tokens, head_dim, device="cuda", dtype=torch.float16) for _ in range(3))
        for causal in (False, True):
            flops = 4 * batch * heads * tokens**2 * head_dim * (0.5 if causal else 1.0)
            for config in configs:
                fn = lambda i: flash_attention_fwd(q, k, v, head_dim**-0.5, causal, config=config)  # noqa: B023
                try:
                    ms = graph_median_ms(fn)
                except Exception as exc:  # out of shared memory or registers: skip the config
                    print(f"  config {config} failed: {type(exc).__name__}")
                    continue
                tflops = flops / ms / 1e9
                rows.append(Row("attention-sweep", f"d{head_dim} {tokens}tok causal={causal}",
                                f"bm{config.block_m} bn{config.block_n} w{config.num_warps} s{config.num_stages}",
                                "float16", ms, tflops, "TFLOP/s", tflops / ceilings["matmul_fp16_tflop_per_s"], None))
    return rows


# -- linear ---------------------------------------------------------------------------------------


def weight_stream_row(workload: str, shape: str, engine: str, ms: float, decode: bool, flops: float,
                      weight_bytes: int, ceilings: dict[str, float], error: float | None) -> Row:
    """A GEMM's row: weight GB/s against the copy ceiling at decode sizes (the weight read is the cost),
    TFLOP/s against the matmul ceiling otherwise."""
    if decode:
        gbps = weight_bytes / ms / 1e6
        return Row(workload, shape, engine, "float16", ms, gbps, "weight GB/s", gbps / ceilings["copy_gb_per_s"], error)
    tflops = flops / ms / 1e9
    return Row(workload, shape, engine, "float16", ms, tflops, "TFLOP/s",
               tflops / ceilings["matmul_fp16_tflop_per_s"], error)

TORCH_ACTIVATIONS = {None: lambda y: y, "gelu": F.gelu, "silu": F.silu}


def linear_cases(quick: bool) -> Iterator[tuple[str, int, int, int, str | None, bool]]:
    """(family, M, N, K, activation, residual)."""
    bert = [(3072, 768, "gelu", False), (768, 3072, None, True), (2304, 768, None, False)]
    llama = [(8192, 2048, "silu", False), (2048, 8192, None, True), (3072, 2048, None, False)]
    for m in (128, 4096) if quick else (128, 1024, 4096, 16384):
        for n, k, act, res in bert:
            yield "bert-base", m, n, k, act, res
    for m in (4096,) if quick else (1024, 4096):
        for n, k, act, res in llama:
            yield "llama-1b", m, n, k, act, res
    for m in (1, 16) if quick else (1, 2, 4, 8, 16):
        for n, k, act, res in llama:
            yield "decode", m, n, k, act, res


def bench_linear(ceilings: dict[str, float], quick: bool = False) -> list[Row]:
    rows = []
    dtype = torch.float16
    for family, m, n, k, act, res in linear_cases(quick):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        weights = [torch.randn(n, k, device="cuda", dtype=dtype) / math.sqrt(k)
                   for _ in range(copies_beyond_l2(n * k * 2))]
        w = weights[0]
        b = torch.randn(n, device="cuda", dtype=dtype)
        r = torch.randn(m, n, device="cuda", dtype=dtype) if res else None
        shape = f"{family} M{m} N{n} K{k} {act or ''}{' +res' if res else ''}".rstrip()
        flops = 2 * m * n * k
        weight_bytes = w.numel() * w.element_size()
        small_m = m <= 16

        def record(engine, fn, error=None, shape=shape, flops=flops, weight_bytes=weight_bytes, small_m=small_m,
                   weights=weights):
            ms = graph_median_ms(lambda i: fn(weights[i]), copies=len(weights))
            rows.append(weight_stream_row("linear", shape, engine, ms, small_m, flops, weight_bytes, ceilings, error))

        ours = lambda w: ops.linear(x, w, b, activation=act, residual=r)  # noqa: B023
        error = relative_error(ours(w), reference.linear(x.float(), w.float(), b.float(), act,
                                                         None if r is None else r.float()))
        record("tritonize", ours, error)

        def torch_unfused(w):
            y = TORCH_ACTIVATIONS[act](F.linear(x, w, b))  # noqa: B023
            return y + r if r is not None else y  # noqa: B023

        record("cublas+separate-epilogue", torch_unfused)
        record("cublas-linear-only", lambda w: F.linear(x, w, b))  # noqa: B023
    return rows


def sweep_linear(ceilings: dict[str, float]) -> list[Row]:
    rows = []
    for m, n, k in ((128, 768, 3072), (1024, 3072, 768), (4096, 3072, 768), (4096, 768, 3072), (4096, 2304, 768),
                    (16384, 3072, 768), (1, 8192, 2048), (1, 2048, 8192)):
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        weights = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(copies_beyond_l2(n * k * 2))]
        b = torch.randn(n, device="cuda", dtype=torch.float16)
        # decode: one block_k and warp count (the least sensitive), every block_n and split
        configs = [c for c in linear_configs(m) if m > 16 or (c.block_k, c.num_warps) == (256, 4)]
        for config in configs:
            fn = lambda i: linear_fwd(x, weights[i], b, "gelu", None, config=config)  # noqa: B023
            try:
                ms = graph_median_ms(fn, copies=len(weights))
            except Exception as exc:
                print(f"  config {config} failed: {type(exc).__name__}")
                continue
            tflops = 2 * m * n * k / ms / 1e9
            rows.append(Row("linear-sweep", f"M{m} N{n} K{k}", repr(config), "float16", ms, tflops, "TFLOP/s",
                            tflops / ceilings["matmul_fp16_tflop_per_s"], None))
        cublas_ms = graph_median_ms(lambda i: F.gelu(F.linear(x, weights[i], b)), copies=len(weights))  # noqa: B023
        rows.append(Row("linear-sweep", f"M{m} N{n} K{k}", "cublas+gelu", "float16", cublas_ms, None, "", None, None))
    return rows


# -- norms ----------------------------------------------------------------------------------------


def norm_cases(quick: bool) -> Iterator[tuple[int, int, torch.dtype]]:
    shapes = ((4096, 4096), (32768, 768)) if quick else (
        (4096, 768), (32768, 768), (4096, 4096), (16384, 4096), (8192, 8192), (4096, 16384))
    for rows, cols in shapes:
        for dtype in (torch.float16, torch.bfloat16):
            yield rows, cols, dtype


def bench_norms(ceilings: dict[str, float], quick: bool = False) -> list[Row]:
    rows = []
    for n_rows, n_cols, dtype in norm_cases(quick):
        tensor_bytes = n_rows * n_cols * dtype.itemsize
        copies = copies_beyond_l2(2 * tensor_bytes)
        xs = [torch.randn(n_rows, n_cols, device="cuda", dtype=dtype) for _ in range(copies)]
        res = torch.randn_like(xs[0])
        w = torch.randn(n_cols, device="cuda", dtype=dtype)
        b = torch.randn(n_cols, device="cuda", dtype=dtype)
        w32, b32, res32 = w.float(), b.float(), res.float()
        variants = {  # name: (bytes moved, tritonize, torch, fp32 reference)
            "layer_norm": (
                2 * tensor_bytes,
                lambda x: ops.layer_norm(x, w, b, 1e-5),  # noqa: B023
                lambda x: F.layer_norm(x, (n_cols,), w, b, 1e-5),  # noqa: B023
                lambda x: reference.layer_norm(x.float(), w32, b32, 1e-5)[0],  # noqa: B023
            ),
            "add+layer_norm": (
                4 * tensor_bytes,
                lambda x: ops.layer_norm(x, w, b, 1e-5, residual=res),  # noqa: B023
                lambda x: F.layer_norm(x + res, (n_cols,), w, b, 1e-5),  # noqa: B023
                lambda x: reference.layer_norm(x.float(), w32, b32, 1e-5, res32)[0],  # noqa: B023
            ),
            "rms_norm": (
                2 * tensor_bytes,
                lambda x: ops.rms_norm(x, w, 1e-6),  # noqa: B023
                lambda x: F.rms_norm(x, (n_cols,), w, 1e-6),  # noqa: B023
                lambda x: reference.rms_norm(x.float(), w32, 1e-6)[0],  # noqa: B023
            ),
            "add+rms_norm": (
                4 * tensor_bytes,
                lambda x: ops.rms_norm(x, w, 1e-6, residual=res),  # noqa: B023
                lambda x: F.rms_norm(x + res, (n_cols,), w, 1e-6),  # noqa: B023
                lambda x: reference.rms_norm(x.float(), w32, 1e-6, res32)[0],  # noqa: B023
            ),
        }
        for name, (moved, ours, theirs, ref) in variants.items():
            shape = f"{name} {n_rows}x{n_cols}"
            out = ours(xs[0])
            error = relative_error(out[0] if isinstance(out, tuple) else out, ref(xs[0]))
            for engine, fn, err in (("tritonize", ours, error), ("torch", theirs, None)):
                ms = graph_median_ms(lambda i, fn=fn: fn(xs[i]), copies=len(xs))  # noqa: B023
                gbps = moved / ms / 1e6
                rows.append(Row("norm", shape, engine, str(dtype).removeprefix("torch."), ms, gbps, "GB/s",
                                gbps / ceilings["copy_gb_per_s"], err))
    return rows


# -- embeddings + LayerNorm -----------------------------------------------------------------------


def embedding_norm_cases(quick: bool) -> Iterator[tuple[int, int]]:
    """(batch, seq) of bert-base inputs (hidden 768: 30522 words, 2 token types, 512 positions)."""
    yield from ((1, 16), (32, 512)) if quick else ((1, 16), (1, 128), (8, 128), (32, 128), (32, 512))


def bench_embedding_norm(ceilings: dict[str, float], quick: bool = False) -> list[Row]:
    """BERT's embedding block: three lookups summed and layer-normalized, in one kernel against PyTorch's
    (three index_selects, two adds, layer_norm); GB/s over the gathered rows read and the output written."""
    hidden, dtype = 768, torch.float16
    tables = [torch.randn(vocab, hidden, device="cuda", dtype=dtype) for vocab in (30522, 2, 512)]
    w, b = torch.randn(hidden, device="cuda", dtype=dtype), torch.randn(hidden, device="cuda", dtype=dtype)
    return [row for batch, seq in embedding_norm_cases(quick)
            for row in _embedding_norm_rows(batch, seq, tables, w, b, ceilings)]


def _embedding_norm_rows(batch, seq, tables, w, b, ceilings) -> list[Row]:
    hidden = tables[0].shape[1]
    moved = 4 * batch * seq * hidden * tables[0].element_size()
    copies = copies_beyond_l2(moved)
    words = [torch.randint(0, tables[0].shape[0], (batch, seq), device="cuda") for _ in range(copies)]
    types, positions = torch.randint(0, 2, (batch, seq), device="cuda"), torch.arange(seq, device="cuda")[None]

    def ours(i):
        return ops.embedding_layer_norm([words[i], types, positions], tables, w, b, 1e-12)

    def theirs(i):
        total = F.embedding(words[i], tables[0]) + F.embedding(types, tables[1])
        return F.layer_norm(total + F.embedding(positions, tables[2]), (hidden,), w, b, 1e-12)

    error = relative_error(ours(0), reference.embedding_layer_norm([words[0], types, positions], tables, w, b, 1e-12))
    rows = []
    for engine, fn, err in (("tritonize", ours, error), ("torch", theirs, None)):
        ms = graph_median_ms(fn, copies=copies)
        gbps = moved / ms / 1e6
        rows.append(Row("embedding+norm", f"bert-base b{batch} s{seq}", engine, "float16", ms, gbps, "GB/s",
                        gbps / ceilings["copy_gb_per_s"], err))
    return rows


# -- decode attention -----------------------------------------------------------------------------


def decode_attention_cases(quick: bool) -> Iterator[tuple[int, int, int, str]]:
    """(batch, max_len, q_len, lengths) for a Llama-8B-like layer: 32 heads, 8 kv heads, head_dim 128."""
    for batch in (1, 8, 32) if quick else (1, 8, 32, 64):
        for max_len in (4096,) if quick else (1024, 4096, 16384):
            for q_len in (1,) if quick else (1, 4, 16):
                for mode in ("full", "ragged"):
                    yield batch, max_len, q_len, mode


def bench_decode_attention(ceilings: dict[str, float], quick: bool = False) -> list[Row]:
    """KV cache bytes read per second (valid positions only), against SDPA with a mask on the same cache."""
    rows = []
    dtype, heads, kv_heads, head_dim = torch.bfloat16, 32, 8, 128
    for batch, max_len, q_len, mode in decode_attention_cases(quick):
        cache_shape = (batch, kv_heads, max_len, head_dim)
        cache_bytes = 2 * math.prod(cache_shape) * dtype.itemsize
        caches = [tuple(torch.randn(cache_shape, device="cuda", dtype=dtype) for _ in range(2))
                  for _ in range(copies_beyond_l2(cache_bytes))]
        q = torch.randn(batch, heads, q_len, head_dim, device="cuda", dtype=dtype)
        if mode == "full":
            seqlens = torch.full((batch,), max_len, dtype=torch.int32, device="cuda")
        else:  # each sequence's length drawn in [max_len/2, max_len]
            seqlens = torch.randint(max_len // 2, max_len + 1, (batch,), dtype=torch.int32, device="cuda")
        read_bytes = 2 * int(seqlens.sum()) * kv_heads * head_dim * dtype.itemsize
        # SDPA sees the cache up to the longest sequence and a mask for the rest (lengths known on the host)
        longest = int(seqlens.max())
        keys = torch.arange(longest, device="cuda")
        last_visible = seqlens[:, None] - q_len + torch.arange(q_len, device="cuda")[None, :]
        sdpa_mask = (keys[None, None, :] <= last_visible[:, :, None])[:, None]
        shape = f"b{batch} h{heads}/{kv_heads} d{head_dim} max{max_len} q{q_len} {mode}"

        def record(engine, fn, error=None, shape=shape, read_bytes=read_bytes, caches=caches):
            ms = graph_median_ms(lambda i: fn(*caches[i]), copies=len(caches))
            gbps = read_bytes / ms / 1e6
            rows.append(Row("decode-attention", shape, engine, "bfloat16", ms, gbps, "KV GB/s",
                            gbps / ceilings["copy_gb_per_s"], error))

        ours = lambda k, v: ops.decode_attention(q, k, v, seqlens)  # noqa: B023
        error = None
        if batch * max_len <= 2**15:
            k, v = caches[0]
            ref = reference.decode_attention(q.float(), k.float(), v.float(), seqlens, head_dim**-0.5)
            error = relative_error(ours(k, v), ref)
        record("tritonize", ours, error)
        record("sdpa-masked", lambda k, v: F.scaled_dot_product_attention(  # noqa: B023
            q, k[:, :, :longest], v[:, :, :longest], attn_mask=sdpa_mask, enable_gqa=True))  # noqa: B023
    return rows


# -- gated MLP ------------------------------------------------------------------------------------


def gated_mlp_cases(quick: bool) -> Iterator[tuple[str, int, int, int]]:
    """(family, M, intermediate, hidden): decode rows stream the weight, prefill rows are compute-bound."""
    models = (("llama-1b", 8192, 2048),) if quick else (("llama-1b", 8192, 2048), ("llama-8b", 14336, 4096))
    for family, intermediate, hidden in models:
        for m in (1, 16, 4096) if quick else (1, 4, 16, 1024, 4096):
            yield family, m, intermediate, hidden


def bench_gated_mlp(ceilings: dict[str, float], quick: bool = False) -> list[Row]:
    """SwiGLU from the concatenated weight against two cuBLAS linears (or one on the same weight) + silu * mul."""
    rows = []
    dtype = torch.float16
    for family, m, intermediate, hidden in gated_mlp_cases(quick):
        x = torch.randn(m, hidden, device="cuda", dtype=dtype)
        weight_bytes = 2 * intermediate * hidden * dtype.itemsize
        weights = [torch.randn(2 * intermediate, hidden, device="cuda", dtype=dtype) / math.sqrt(hidden)
                   for _ in range(copies_beyond_l2(weight_bytes))]
        shape = f"{family} M{m} I{intermediate} H{hidden} silu"
        flops = 2 * m * 2 * intermediate * hidden

        def record(engine, fn, error=None, shape=shape, m=m, flops=flops, weight_bytes=weight_bytes,
                   weights=weights):
            ms = graph_median_ms(lambda i: fn(weights[i]), copies=len(weights))
            rows.append(weight_stream_row("gated-mlp", shape, engine, ms, m <= 16, flops, weight_bytes, ceilings,
                                          error))

        def two_linears(w, x=x, n=intermediate):
            return F.silu(F.linear(x, w[:n])) * F.linear(x, w[n:])

        def one_linear(w, x=x):
            gate, up = F.linear(x, w).chunk(2, dim=-1)
            return F.silu(gate) * up

        ours = lambda w: ops.gated_mlp(x, w, activation="silu")  # noqa: B023
        error = relative_error(ours(weights[0]), reference.gated_mlp(x.float(), weights[0].float(), None, "silu"))
        record("tritonize", ours, error)
        record("cublas-2-linears+silu*mul", two_linears)
        record("cublas-concat-linear+silu*mul", one_linear)
    return rows


# -- rotary embeddings ----------------------------------------------------------------------------


def rotary_cases(quick: bool) -> Iterator[tuple[int, int, bool]]:
    """(batch, seq, interleaved) for Llama-1B attention: 32 heads, 8 kv heads, head_dim 64."""
    for batch, seq in ((8, 2048), (64, 1)) if quick else ((1, 2048), (8, 512), (8, 2048), (8, 1), (64, 1)):
        for interleaved in (False, True):
            yield batch, seq, interleaved


def bench_rotary(ceilings: dict[str, float], quick: bool = False) -> list[Row]:
    """GB/s over q and k read and written plus cos and sin read, against HF's apply_rotary_pos_emb in eager
    torch (half rotation; its interleaved row times the same HF function, GPT-J's layout costs the same)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    rows = []
    dtype, heads, kv_heads, head_dim = torch.bfloat16, 32, 8, 64
    for batch, seq, interleaved in rotary_cases(quick):
        # q, k as HF makes them: projections viewed [batch, seq, heads, head_dim], then transposed
        qk_bytes = batch * seq * (heads + kv_heads) * head_dim * dtype.itemsize
        inputs = [(torch.randn(batch, seq, heads, head_dim, device="cuda", dtype=dtype).transpose(1, 2),
                   torch.randn(batch, seq, kv_heads, head_dim, device="cuda", dtype=dtype).transpose(1, 2))
                  for _ in range(copies_beyond_l2(2 * qk_bytes))]
        angles = torch.rand(batch, seq, head_dim, device="cuda") * 100
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        moved = 2 * qk_bytes + 2 * cos.numel() * dtype.itemsize
        shape = f"b{batch} s{seq} h{heads}/{kv_heads} d{head_dim} {'interleaved' if interleaved else 'half'}"

        def record(engine, fn, error=None, shape=shape, moved=moved, inputs=inputs):
            ms = graph_median_ms(lambda i: fn(*inputs[i]), copies=len(inputs))
            gbps = moved / ms / 1e6
            rows.append(Row("rotary", shape, engine, "bfloat16", ms, gbps, "GB/s", gbps / ceilings["copy_gb_per_s"],
                            error))

        ours = lambda q, k: ops.rotary(q, k, cos, sin, interleaved=interleaved)  # noqa: B023
        q, k = inputs[0]
        ref = reference.rotary(q.float(), k.float(), cos.float(), sin.float(), interleaved)
        error = relative_error(torch.cat([t.flatten() for t in ours(q, k)]), torch.cat([t.flatten() for t in ref]))
        record("tritonize", ours, error)
        record("hf-eager", lambda q, k: apply_rotary_pos_emb(q, k, cos, sin))  # noqa: B023
    return rows


def run(parts: tuple[str, ...], quick: bool, sweep: bool, progress: Callable[[str], None] = print) -> dict:
    ceilings = measure_ceilings()
    progress(f"ceilings: {ceilings}")
    benches = {"attention": bench_attention, "linear": bench_linear, "norm": bench_norms,
               "embedding-norm": bench_embedding_norm, "decode-attention": bench_decode_attention,
               "gated-mlp": bench_gated_mlp, "rotary": bench_rotary}
    sweeps = {"attention": sweep_attention, "linear": sweep_linear}
    rows: list[Row] = []
    for part in parts:
        if sweep and part not in sweeps:
            continue
        progress(f"{'sweeping configs of' if sweep else 'benchmarking'} {part} ...")
        with torch.inference_mode():
            rows += sweeps[part](ceilings) if sweep else benches[part](ceilings, quick)
    return {"ceilings": ceilings, "rows": rows}
