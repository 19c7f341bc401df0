"""The GEMVs between two decode attentions as one persistent launch, phases joined by grid barriers.

At batch 1 or 2 a decoder layer's matrix work after attention is four GEMVs in a row, each reading the
previous one's output: the output projection (+ residual), RMSNorm + gate/up (gated activation), the down
projection (+ residual), then RMSNorm + the next layer's QKV projection (or the lm_head). As four launches,
each pays a ramp-up and a tail while HBM idles. Here one grid of programs, all resident at once, runs the
four as phases: program p computes row blocks p, p + G, ... of each matrix, then counts itself in at a grid
barrier (an atomic counter), loads the first weight tiles of its first block of the next phase (weights never
change) and waits until every program has finished the phase, so every SM keeps weight reads in flight
across the joins.

The grid must be co-resident, or the barrier waits forever: `chain_programs` sizes it from the compiled
kernel's registers and the GPU's SM count. Under the interpreter programs run one after another, so there
the grid is one program (the barrier then never waits). Must never import torch.fx, Dynamo or transformers.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from tritonize.kernels.common import INTERPRETED, pdl_supported, wait_previous_allow_next
from tritonize.kernels.gemv import GEMV_MAX_M, GemvConfig, _first_tiles, _gemv_block, pick_config


@triton.jit
def _grid_arrive(counter_ptr):
    """Counts this program in at a grid barrier, once all its threads are here (a CTA barrier): one thread adds
    1 with release semantics, so the program's writes so far are visible to any program that sees the count.
    The release waits for that thread's memory operations in flight (on sm_90: MEMBAR.ALL.GPU), so arrive
    before loading the next phase's weights, not after."""
    tl.debug_barrier()
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")


@triton.jit
def _grid_wait(counter_ptr, target):
    """Returns once the counter has reached target (every program of the grid has arrived), with acquire
    semantics: the writes programs made before arriving are visible after it. One thread polls; the CTA
    barrier orders the program's other threads after it. Loads issued before the wait stay in flight."""
    arrived = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    while arrived < target:
        arrived = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _phase(
    X_ptr, W_ptr, B_ptr, R_ptr, Y_ptr, G_ptr, M, N, K, eps, w0, w1, up0, up1,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RMS_NORM: tl.constexpr,
    GATED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    STREAM: tl.constexpr,
):  # fmt: skip
    """This program's row blocks of one GEMV (x, weight, residual and output contiguous; the residual
    [M, N]); the first block's first tiles given (w0, w1, up0, up1). STREAM (K > BLOCK_K): each block's
    loop reads on into the next block's first tiles; otherwise they are loaded at the block's start."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    for n_block in range(pid, tl.cdiv(N, BLOCK_N), programs):
        if not STREAM and n_block != pid:
            w0, w1, up0, up1 = _first_tiles(W_ptr, n_block, N, K, K, GATED, BLOCK_N, BLOCK_K)
        w0, w1, up0, up1 = _gemv_block(
            n_block, n_block + programs, w0, w1, up0, up1, X_ptr, W_ptr, B_ptr, R_ptr, Y_ptr, G_ptr, M, N, K,
            eps, K, K, N, 1, HAS_BIAS, ACTIVATION, HAS_RESIDUAL, RMS_NORM, GATED, BLOCK_M, BLOCK_N, BLOCK_K,
            STREAM,
        )  # fmt: skip


@triton.jit
def _layer_chain_kernel(
    Attn_ptr, H_ptr, Counter_ptr,
    Wo_ptr, Bo_ptr, Hmid_ptr,
    Gmlp_ptr, Wgu_ptr, Bgu_ptr, Act_ptr,
    Wd_ptr, Bd_ptr, Hout_ptr,
    Gnext_ptr, Wnext_ptr, Bnext_ptr, Next_ptr,
    M, A, D, Inter, N_next, eps_mlp, eps_next,
    HAS_BIAS_O: tl.constexpr, HAS_BIAS_UP: tl.constexpr, HAS_BIAS_DOWN: tl.constexpr,
    HAS_BIAS_NEXT: tl.constexpr, ACTIVATION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
    STREAM: tl.constexpr,
):  # fmt: skip
    """h_mid = attn @ Wo^T + bo + h; act = act(norm(h_mid) @ Wg^T + bg) * (norm(h_mid) @ Wu^T + bu);
    h_out = act @ Wd^T + bd + h_mid; next = norm'(h_out) @ Wnext^T + bnext.

    Attn_ptr: [M, A] attention output; H_ptr: [M, D] residual stream in; Wo [D, A]; Gmlp [D] the MLP's
    RMSNorm weight; Wgu cat([W_gate, W_up]) [2 Inter, D]; Wd [D, Inter]; Gnext [D], Wnext [N_next, D]: the next
    layer's input norm and QKV projection (or the final norm and lm_head). Hmid [M, D], Act [M, Inter] are
    scratch; Hout [M, D], Next [M, N_next] outputs. Every tensor contiguous, M <= BLOCK_M. Counter_ptr: an
    int32, 0 at launch and again at the end (three barriers take it to 3 G; once every program has passed
    the third, the last to count again sets it back to 0). Grid: G programs, all resident at once.
    """
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    w0, w1, up0, up1 = _first_tiles(Wo_ptr, pid, D, A, A, False, BLOCK_N, BLOCK_K)
    wait_previous_allow_next(PDL)
    _phase(Attn_ptr, Wo_ptr, Bo_ptr, H_ptr, Hmid_ptr, Gmlp_ptr, M, D, A, eps_mlp, w0, w1, up0, up1,
           HAS_BIAS_O, "none", True, False, False, BLOCK_M, BLOCK_N, BLOCK_K, STREAM)  # fmt: skip

    _grid_arrive(Counter_ptr)
    w0, w1, up0, up1 = _first_tiles(Wgu_ptr, pid, Inter, D, D, True, BLOCK_N, BLOCK_K)
    _grid_wait(Counter_ptr, programs)
    _phase(Hmid_ptr, Wgu_ptr, Bgu_ptr, H_ptr, Act_ptr, Gmlp_ptr, M, Inter, D, eps_mlp, w0, w1, up0, up1,
           HAS_BIAS_UP, ACTIVATION, False, True, True, BLOCK_M, BLOCK_N, BLOCK_K, STREAM)  # fmt: skip

    _grid_arrive(Counter_ptr)
    w0, w1, up0, up1 = _first_tiles(Wd_ptr, pid, D, Inter, Inter, False, BLOCK_N, BLOCK_K)
    _grid_wait(Counter_ptr, 2 * programs)
    _phase(Act_ptr, Wd_ptr, Bd_ptr, Hmid_ptr, Hout_ptr, Gmlp_ptr, M, D, Inter, eps_mlp, w0, w1, up0, up1,
           HAS_BIAS_DOWN, "none", True, False, False, BLOCK_M, BLOCK_N, BLOCK_K, STREAM)  # fmt: skip

    _grid_arrive(Counter_ptr)
    w0, w1, up0, up1 = _first_tiles(Wnext_ptr, pid, N_next, D, D, False, BLOCK_N, BLOCK_K)
    _grid_wait(Counter_ptr, 3 * programs)
    if tl.atomic_add(Counter_ptr, 1, sem="relaxed", scope="gpu") == 4 * programs - 1:
        tl.atomic_xchg(Counter_ptr, 0, sem="relaxed", scope="gpu")
    _phase(Hout_ptr, Wnext_ptr, Bnext_ptr, H_ptr, Next_ptr, Gnext_ptr, M, N_next, D, eps_next, w0, w1, up0, up1,
           HAS_BIAS_NEXT, "none", False, True, False, BLOCK_M, BLOCK_N, BLOCK_K, STREAM)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ChainWeights:
    """One decoder layer's weights after attention, and the next projection's (the next layer's input norm and
    QKV projection, or the final norm and lm_head). Shapes as `_layer_chain_kernel`'s; biases optional."""

    o_weight: torch.Tensor
    o_bias: torch.Tensor | None
    mlp_norm_weight: torch.Tensor
    mlp_eps: float
    gate_up_weight: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down_weight: torch.Tensor
    down_bias: torch.Tensor | None
    next_norm_weight: torch.Tensor
    next_eps: float
    next_weight: torch.Tensor
    next_bias: torch.Tensor | None


def supports(attn: torch.Tensor, weights: ChainWeights) -> bool:
    """Whether `layer_chain_fwd` takes these operands: at most GEMV_MAX_M rows, every tensor contiguous and
    in attn's dtype, the shapes chaining (checked in full by `layer_chain_fwd`)."""
    fields = (getattr(weights, field.name) for field in dataclasses.fields(weights))
    tensors = [attn] + [t for t in fields if isinstance(t, torch.Tensor)]
    return (attn.dim() == 2 and attn.shape[0] <= GEMV_MAX_M
            and all(t.is_contiguous() and t.dtype == attn.dtype and t.device == attn.device for t in tensors))


def layer_chain_fwd(
    attn: torch.Tensor, h: torch.Tensor, weights: ChainWeights, activation: str, counter: torch.Tensor,
    *, out: tuple[torch.Tensor, torch.Tensor] | None = None, config: GemvConfig | None = None,
    stream: bool | None = None, pdl: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h_out, next) of `_layer_chain_kernel`: attn [M, A] the attention output, h [M, D] the residual stream
    before the output projection; counter: an int32 [1] tensor, 0 (the kernel leaves it 0), used by one
    stream at a time. out: contiguous (h_out [M, D], next [M, N_next]) to write (default: new tensors).
    config: the tiles (default: `gemv.pick_config`'s for the largest matrix). stream: each program's weight
    reads run on from one row block into its next (default: wherever every K exceeds BLOCK_K, which it
    needs). pdl: launch as a programmatic dependent launch (default: where the GPU has it)."""
    (M, A), D = attn.shape, h.shape[1]
    Inter, N_next = weights.gate_up_weight.shape[0] // 2, weights.next_weight.shape[0]
    expected = {"h": (h, (M, D)), "o_weight": (weights.o_weight, (D, A)), "mlp_norm_weight":
                (weights.mlp_norm_weight, (D,)), "gate_up_weight": (weights.gate_up_weight, (2 * Inter, D)),
                "down_weight": (weights.down_weight, (D, Inter)), "next_norm_weight": (weights.next_norm_weight, (D,)),
                "next_weight": (weights.next_weight, (N_next, D)), "o_bias": (weights.o_bias, (D,)),
                "gate_up_bias": (weights.gate_up_bias, (2 * Inter,)), "down_bias": (weights.down_bias, (D,)),
                "next_bias": (weights.next_bias, (N_next,))}  # fmt: skip
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"layer_chain_fwd: {name} has shape {tuple(tensor.shape)}, expected {shape} "
                             f"(attention output {tuple(attn.shape)}, hidden {D}, intermediate {Inter})")
    if not supports(attn, weights) or not h.is_contiguous() or h.dtype != attn.dtype:
        raise ValueError(f"layer_chain_fwd takes at most {GEMV_MAX_M} rows and contiguous tensors of one dtype "
                         f"and device, got attention output {tuple(attn.shape)} {attn.dtype} on {attn.device}")
    if counter.dtype != torch.int32 or counter.numel() != 1 or counter.device != attn.device:
        raise ValueError("layer_chain_fwd: counter must be one int32 on the operands' device")
    h_out, nxt = out if out is not None else (torch.empty_like(h), attn.new_empty((M, N_next)))
    if h_out.shape != h.shape or nxt.shape != (M, N_next) or not (h_out.is_contiguous() and nxt.is_contiguous()):
        raise ValueError(f"layer_chain_fwd: out must be contiguous tensors of shapes {tuple(h.shape)} and "
                         f"{(M, N_next)}, got {tuple(h_out.shape)} and {tuple(nxt.shape)}")
    h_mid, act = torch.empty_like(h), attn.new_empty((M, Inter))  # written before they are read
    if M == 0:
        return h_out, nxt
    config = config or pick_config(M, max(D, N_next), max(A, D, Inter), attn.dtype)
    shortest_k = min(A, D, Inter)
    if stream is None:
        stream = shortest_k > config.block_k
    elif stream and shortest_k <= config.block_k:
        raise ValueError(f"layer_chain_fwd: stream needs every K above block_k {config.block_k}, the shortest is "
                         f"{shortest_k}")
    pdl = pdl_supported(attn.device) if pdl is None else pdl
    w = weights
    args = (
        attn, h, counter, w.o_weight, w.o_bias, h_mid, w.mlp_norm_weight, w.gate_up_weight, w.gate_up_bias, act,
        w.down_weight, w.down_bias, h_out, w.next_norm_weight, w.next_weight, w.next_bias, nxt,
        M, A, D, Inter, N_next, float(w.mlp_eps), float(w.next_eps),
    )  # fmt: skip
    options = dict(
        HAS_BIAS_O=w.o_bias is not None, HAS_BIAS_UP=w.gate_up_bias is not None,
        HAS_BIAS_DOWN=w.down_bias is not None, HAS_BIAS_NEXT=w.next_bias is not None, ACTIVATION=activation,
        BLOCK_M=max(1, triton.next_power_of_2(M)), BLOCK_N=config.block_n, BLOCK_K=config.block_k, PDL=pdl,
        STREAM=stream, num_warps=config.num_warps, num_stages=config.num_stages, launch_pdl=pdl,
        launch_cooperative_grid=not INTERPRETED,
    )  # fmt: skip
    programs = 1 if INTERPRETED else chain_programs(args, options)
    _layer_chain_kernel[(programs,)](*args, **options)
    return h_out, nxt


_PROGRAMS: dict[tuple, int] = {}  # chain_programs' answers, by device, arguments' specialization, options


def chain_programs(args: tuple, options: dict) -> int:
    """The grid of `_layer_chain_kernel` for these arguments and launch options: as many programs as fit on all
    SMs at once (by the compiled kernel's registers, threads and shared memory), so the grid barriers complete."""
    device = args[0].device
    # what the JIT specializes a compile on: dtypes and 16-byte alignment of tensors, values of the rest
    key = (device, *((a.dtype, a.data_ptr() % 16) if isinstance(a, torch.Tensor) else a for a in args),
           *sorted(options.items()))
    if key not in _PROGRAMS:
        kernel = _layer_chain_kernel.warmup(*args, **options, grid=(1,))
        kernel._init_handles()  # loads the binary: the register count is read off it
        props = torch.cuda.get_device_properties(device)
        warps = options["num_warps"]
        registers_per_warp = -(-kernel.n_regs * 32 // 256) * 256  # allocated per warp in units of 256
        shared = kernel.metadata.shared
        per_sm = min(props.regs_per_multiprocessor // (registers_per_warp * warps),
                     props.max_threads_per_multi_processor // (32 * warps),
                     props.shared_memory_per_multiprocessor // (shared + 1024) if shared else 32, 32)
        _PROGRAMS[key] = max(1, per_sm) * props.multi_processor_count
    return _PROGRAMS[key]
