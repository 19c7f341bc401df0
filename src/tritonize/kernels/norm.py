"""LayerNorm and RMSNorm forward kernels, optionally fused with the residual add before them.

Each program normalizes whole rows held in registers: x (+ residual) is read once, y (and h = x +
residual) written once, statistics in fp32. Must never import torch.fx, Dynamo or transformers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tritonize.kernels.common import cast, pdl_supported, wait_previous_allow_next
from tritonize.kernels.reference import RMS_NORM_VARIANTS

# Short rows are grouped so that one program moves at least this many elements (e.g. 2 rows of 768). An H100
# sweep of LayerNorm (fp16, 2026-11-26) preferred 2048 to 4096: 4096x768 rows 5.1 vs 6.9 us, 16384x768 17.8 vs
# 20.8 us, 16x768 1.8 vs 2.1 us; equal at 384 and 2048+ columns.
MIN_ELEMENTS_PER_PROGRAM = 2048
# The norm kernels launch with programmatic dependent launch, where the caller does not say (`pdl=`), on at
# most this many rows. bert-base fp16 in tritonize's CUDA graphs on an H100 (2026-12-07, A/B in one process,
# ab-layer-norm-bert-base-*.json): 1 x 16 0.357 vs 0.375 ms, 1 x 512 0.631 vs 0.643 ms, 1 x 128 equal; at
# 1024 and 4096 rows slower: 8 x 128 0.820 vs 0.759 ms, 32 x 128 1.819 vs 1.801 ms.
PDL_MAX_ROWS = 512
# Counted positions (RoBERTa's) read the tokens before each one this many at a time (one size for every
# sequence length: no compile per length).
BLOCK_SEQ = 256


@triton.jit
def _row_block(n_rows, n_cols, ROWS_PER_PROGRAM: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Row indices [ROWS, 1] (int64), column indices [1, BLOCK_SIZE] and the in-bounds mask."""
    rows = tl.program_id(0).to(tl.int64) * ROWS_PER_PROGRAM + tl.arange(0, ROWS_PER_PROGRAM)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    return rows[:, None], cols[None, :], mask


@triton.jit
def _store_rows(P_ptr, value, rows, cols, mask, row_stride):
    tl.store(P_ptr + rows * row_stride + cols, cast(value, P_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_param(P_ptr, cols, n_cols):
    """A [n_cols] weight or bias of any float dtype as fp32 [1, BLOCK_SIZE], zero past n_cols."""
    return tl.load(P_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)


@triton.jit
def _load_h(
    X_ptr, R_ptr, H_ptr, rows, cols, mask, x_row_stride, r_row_stride, h_row_stride,
    HAS_RESIDUAL: tl.constexpr, STORE_SUM: tl.constexpr,
):  # fmt: skip
    """h = x (+ residual) in fp32, zero outside mask; with a residual and STORE_SUM, h is also stored in x's
    dtype."""
    h = tl.load(X_ptr + rows * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h += tl.load(R_ptr + rows * r_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        if STORE_SUM:
            _store_rows(H_ptr, h, rows, cols, mask, h_row_stride)
    return h


@triton.jit
def layer_norm_rows(h, cols, mask, n_cols, eps, W_ptr, B_ptr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """(h - mean) / sqrt(var + eps) * weight + bias over each row of h [ROWS, BLOCK_SIZE] (fp32, zero outside
    mask; cols [1, BLOCK_SIZE]); W_ptr, B_ptr as in _layer_norm_fwd_kernel. Also the epilogue of linear.py's
    split-K reduce, which holds whole rows too."""
    # -- two-pass statistics on the rows in registers (exact for inputs with a large common offset) --
    mean = tl.sum(h, axis=1)[:, None] / n_cols
    centered = tl.where(mask, h - mean, 0.0)
    var = tl.sum(centered * centered, axis=1)[:, None] / n_cols
    y = centered * tl.rsqrt(var + eps)
    # -- affine --
    if HAS_WEIGHT:
        y = y * _load_param(W_ptr, cols, n_cols)
    if HAS_BIAS:
        y = y + _load_param(B_ptr, cols, n_cols)
    return y


@triton.jit
def _layer_norm_fwd_kernel(
    X_ptr, R_ptr, Y_ptr, H_ptr, W_ptr, B_ptr,
    x_row_stride, r_row_stride, y_row_stride, h_row_stride, n_rows, n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, STORE_SUM: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr, BLOCK_SIZE: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """y = (h - mean) / sqrt(var + eps) * weight + bias over each row of h = x (+ residual).

    X_ptr, R_ptr: input and residual, [n_rows, n_cols], rows x_row_stride / r_row_stride apart,
    columns contiguous. Y_ptr, H_ptr: outputs norm(h) and h, same layout with y_row_stride /
    h_row_stride (R_ptr unused without HAS_RESIDUAL, H_ptr unless HAS_RESIDUAL and STORE_SUM). W_ptr,
    B_ptr: [n_cols], contiguous, any float dtype (unused without HAS_WEIGHT / HAS_BIAS). Program i handles rows
    i * ROWS_PER_PROGRAM onward; BLOCK_SIZE >= n_cols. PDL: launched as a programmatic dependent launch
    (common.py).
    """
    wait_previous_allow_next(PDL)  # nothing is read or written before the previous kernel has ended
    rows, cols, mask = _row_block(n_rows, n_cols, ROWS_PER_PROGRAM, BLOCK_SIZE)
    h = _load_h(X_ptr, R_ptr, H_ptr, rows, cols, mask, x_row_stride, r_row_stride, h_row_stride,
                HAS_RESIDUAL, STORE_SUM)
    y = layer_norm_rows(h, cols, mask, n_cols, eps, W_ptr, B_ptr, HAS_WEIGHT, HAS_BIAS)
    _store_rows(Y_ptr, y, rows, cols, mask, y_row_stride)


@triton.jit
def _rms_norm_fwd_kernel(
    X_ptr, R_ptr, Y_ptr, H_ptr, W_ptr,
    x_row_stride, r_row_stride, y_row_stride, h_row_stride, n_rows, n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, STORE_SUM: tl.constexpr, WEIGHT_OFFSET: tl.constexpr,
    ROUND_BEFORE_WEIGHT: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr, BLOCK_SIZE: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """y = h / sqrt(mean(h^2) + eps) * (WEIGHT_OFFSET + weight) over each row of h = x (+ residual).

    Pointers, strides and sizes as in _layer_norm_fwd_kernel; W_ptr is required. ROUND_BEFORE_WEIGHT
    rounds the normalized value to the output dtype before the weight multiply (Llama, T5);
    WEIGHT_OFFSET is 1.0 for Gemma's (1 + weight), else 0.0.
    """
    wait_previous_allow_next(PDL)  # nothing is read or written before the previous kernel has ended
    rows, cols, mask = _row_block(n_rows, n_cols, ROWS_PER_PROGRAM, BLOCK_SIZE)
    h = _load_h(X_ptr, R_ptr, H_ptr, rows, cols, mask, x_row_stride, r_row_stride, h_row_stride,
                HAS_RESIDUAL, STORE_SUM)
    # -- mean of squares, then scale --
    y = h * tl.rsqrt(tl.sum(h * h, axis=1)[:, None] / n_cols + eps)
    if ROUND_BEFORE_WEIGHT:
        y = cast(y, Y_ptr.dtype.element_ty).to(tl.float32)
    y = y * (_load_param(W_ptr, cols, n_cols) + WEIGHT_OFFSET)
    _store_rows(Y_ptr, y, rows, cols, mask, y_row_stride)


@triton.jit
def _counted_positions(Src_ptr, src_batch_stride, src_seq_stride, batch, pos, seq_len, padding_idx, past_length,
                       BLOCK_SEQ: tl.constexpr):
    """Each token's position counted past padding, [ROWS, 1] int64: padding_idx where src[batch, pos] is
    padding_idx, else padding_idx + past_length + the number of tokens other than padding_idx in
    src[batch, :pos + 1] (fairseq's make_positions, as HF RoBERTa numbers its tokens)."""
    count = tl.zeros(pos.shape, dtype=tl.int64)
    for start in range(0, seq_len, BLOCK_SEQ):
        earlier = start + tl.arange(0, BLOCK_SEQ)[None, :]
        src = tl.load(Src_ptr + batch * src_batch_stride + earlier * src_seq_stride, mask=earlier <= pos,
                      other=padding_idx)
        count += tl.sum((src != padding_idx).to(tl.int64), axis=1, keep_dims=True)
    own = tl.load(Src_ptr + batch * src_batch_stride + pos * src_seq_stride)
    return tl.where(own != padding_idx, count + padding_idx + past_length, padding_idx)


@triton.jit
def _gathered_rows(Ids_ptr, ids_batch_stride, ids_seq_stride, Map_ptr, map_len, map_stride, T_ptr, t_rows,
                   t_row_stride, batch, pos, positions, cols, mask, HAS_MAP: tl.constexpr, POSITIONS: tl.constexpr):
    """Rows T[ids[batch, pos]] (with POSITIONS: T[positions], the counted positions of the token; with HAS_MAP:
    T[Map[...]] of those ids, the map map_len ids map_stride apart) as fp32 [ROWS, BLOCK_SIZE], zero outside
    mask; NaN for an id outside [0, t_rows) or outside the map (nothing is read there: the caller's result is
    then NaN, never another row's values)."""
    if POSITIONS:
        ids = positions
    else:
        ids = tl.load(Ids_ptr + batch * ids_batch_stride + pos * ids_seq_stride)
    if HAS_MAP:
        in_map = (ids >= 0) & (ids < map_len)
        ids = tl.load(Map_ptr + ids.to(tl.int64) * map_stride, mask=in_map, other=-1)
    valid = (ids >= 0) & (ids < t_rows)
    row = tl.load(T_ptr + ids.to(tl.int64) * t_row_stride + cols, mask=mask & valid, other=0.0).to(tl.float32)
    return tl.where(valid, row, float("nan"))


@triton.jit
def _embedding_layer_norm_kernel(
    Ids0_ptr, Ids1_ptr, Ids2_ptr, Map0_ptr, Map1_ptr, Map2_ptr, T0_ptr, T1_ptr, T2_ptr, Y_ptr, W_ptr, B_ptr,
    Src_ptr, ids0_batch_stride, ids0_seq_stride, ids1_batch_stride, ids1_seq_stride, ids2_batch_stride,
    ids2_seq_stride, src_batch_stride, src_seq_stride, padding_idx, past_length,
    map0_len, map1_len, map2_len, map0_stride, map1_stride, map2_stride,
    t0_rows, t1_rows, t2_rows, t0_row_stride, t1_row_stride, t2_row_stride, n_rows, n_cols, seq_len, eps,
    NUM_TABLES: tl.constexpr, HAS_MAP0: tl.constexpr, HAS_MAP1: tl.constexpr, HAS_MAP2: tl.constexpr,
    POSITIONS0: tl.constexpr, POSITIONS1: tl.constexpr, POSITIONS2: tl.constexpr, BLOCK_SEQ: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr, BLOCK_SIZE: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """y = layer_norm(T0[ids0] + T1[ids1] (+ T2[ids2])) for each token (row) of a [batch, seq_len] input.

    Ids*_ptr: integer ids, token (b, s) at b * ids_batch_stride + s * ids_seq_stride (stride 0 broadcasts, as
    BERT's position ids over the batch). POSITIONS*: that lookup reads, instead of ids, each token's position
    counted past padding in the token ids at Src_ptr (`_counted_positions`, BLOCK_SEQ of them a step; RoBERTa's
    position ids). Map*_ptr (with HAS_MAP*): the ids index this integer vector first, and
    the table row is the value found there (BERT's token types read from a buffer through the positions).
    T*_ptr: tables [t_rows, n_cols], rows t_row_stride apart, columns contiguous, in Y's dtype; the gathered
    rows are summed in order, each sum rounded to Y's dtype as eager adds store it. Y_ptr: [n_rows = batch *
    seq_len, n_cols], contiguous. W_ptr, B_ptr as in _layer_norm_fwd_kernel. An id outside its table or map
    gives a row of NaN. PDL: as in _layer_norm_fwd_kernel.
    """
    wait_previous_allow_next(PDL)  # nothing is read or written before the previous kernel has ended
    rows, cols, mask = _row_block(n_rows, n_cols, ROWS_PER_PROGRAM, BLOCK_SIZE)
    rows = tl.minimum(rows, n_rows - 1)  # rows past the end repeat the last (never stored): ids stay in bounds
    batch, pos = rows // seq_len, rows % seq_len
    positions = pos  # read by no lookup unless one is POSITIONS
    if POSITIONS0 or POSITIONS1 or POSITIONS2:
        positions = _counted_positions(Src_ptr, src_batch_stride, src_seq_stride, batch, pos, seq_len, padding_idx,
                                       past_length, BLOCK_SEQ)
    h = _gathered_rows(Ids0_ptr, ids0_batch_stride, ids0_seq_stride, Map0_ptr, map0_len, map0_stride, T0_ptr,
                       t0_rows, t0_row_stride, batch, pos, positions, cols, mask, HAS_MAP0, POSITIONS0)
    h += _gathered_rows(Ids1_ptr, ids1_batch_stride, ids1_seq_stride, Map1_ptr, map1_len, map1_stride, T1_ptr,
                        t1_rows, t1_row_stride, batch, pos, positions, cols, mask, HAS_MAP1, POSITIONS1)
    h = cast(h, Y_ptr.dtype.element_ty).to(tl.float32)
    if NUM_TABLES == 3:
        h += _gathered_rows(Ids2_ptr, ids2_batch_stride, ids2_seq_stride, Map2_ptr, map2_len, map2_stride, T2_ptr,
                            t2_rows, t2_row_stride, batch, pos, positions, cols, mask, HAS_MAP2, POSITIONS2)
        h = cast(h, Y_ptr.dtype.element_ty).to(tl.float32)
    h = tl.where(mask, h, 0.0)
    y = layer_norm_rows(h, cols, mask, n_cols, eps, W_ptr, B_ptr, HAS_WEIGHT, HAS_BIAS)
    _store_rows(Y_ptr, y, rows, cols, mask, n_cols)


def launch_config(n_rows: int, n_cols: int, min_elements: int = MIN_ELEMENTS_PER_PROGRAM) -> tuple[int, int, int]:
    """(BLOCK_SIZE, ROWS_PER_PROGRAM, num_warps) for whole rows in registers.

    One program covers a full row; short rows are grouped until a program holds about min_elements
    elements, so that each moves enough bytes to hide memory latency.
    Warps grow with the elements per program (up to 16), so a thread holds at most 32 of them.
    """
    block_size = triton.next_power_of_2(n_cols)
    rows = min(max(1, min_elements // block_size), triton.next_power_of_2(max(n_rows, 1)))
    elements = rows * block_size
    num_warps = 4 if elements <= 2048 else 8 if elements <= 8192 else 16
    return block_size, rows, num_warps


def _norm_fwd(kernel, x, params, eps, residual, out, residual_out, keep_sum, pdl, **flags):
    """Allocates outputs and launches `kernel` over the rows of x [n_rows, n_cols]; returns (y, h).
    pdl: launch as a programmatic dependent launch (None: up to PDL_MAX_ROWS rows, where the GPU has it)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    n_rows, n_cols = x.shape
    y = out if out is not None else x.new_empty(x.shape)
    h = None
    if residual is not None:
        if residual.stride(-1) != 1:
            residual = residual.contiguous()
        if keep_sum:
            h = residual_out if residual_out is not None else x.new_empty(x.shape)
    if n_rows == 0:
        return y, h
    block_size, rows_per_program, num_warps = launch_config(n_rows, n_cols)
    # Unused pointers (no residual, no h, no weight/bias) point at x or y; the kernel never touches them.
    r = x if residual is None else residual
    h_buf = y if h is None else h
    pdl = n_rows <= PDL_MAX_ROWS and pdl_supported(x.device) if pdl is None else pdl
    kernel[(triton.cdiv(n_rows, rows_per_program),)](
        x, r, y, h_buf, *(x if p is None else p.contiguous() for p in params),
        x.stride(0), r.stride(0), y.stride(0), h_buf.stride(0), n_rows, n_cols, eps,
        HAS_RESIDUAL=residual is not None, STORE_SUM=h is not None, ROWS_PER_PROGRAM=rows_per_program,
        BLOCK_SIZE=block_size, PDL=pdl, num_warps=num_warps, launch_pdl=pdl, **flags,
    )  # fmt: skip
    return y, h


def layer_norm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
    keep_sum: bool = True,
    pdl: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """LayerNorm of h = x (+ residual) over rows of x [M, n_cols]; returns (y, h or None) in x's dtype.

    out / residual_out: optional preallocated [M, n_cols] outputs (last dim contiguous). keep_sum=False:
    h is not stored (None is returned for it) where nothing reads it, one write of [M, n_cols] less.
    pdl: launch as a programmatic dependent launch (sm_90+ only; default: on up to PDL_MAX_ROWS rows).
    """
    return _norm_fwd(
        _layer_norm_fwd_kernel, x, (weight, bias), eps, residual, out, residual_out, keep_sum, pdl,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
    )  # fmt: skip


def rms_norm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    variant: str = "llama",
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
    keep_sum: bool = True,
    pdl: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm of h = x (+ residual) with a model family's numerics (see reference.rms_norm).

    variant: "llama" or "t5" (round, then weight) or "gemma" ((1 + weight) in fp32, then round).
    out, residual_out, keep_sum, pdl: as in layer_norm_fwd.
    """
    if variant not in RMS_NORM_VARIANTS:
        raise ValueError(f"variant must be one of {RMS_NORM_VARIANTS}, got {variant!r}")
    return _norm_fwd(
        _rms_norm_fwd_kernel, x, (weight,), eps, residual, out, residual_out, keep_sum, pdl,
        WEIGHT_OFFSET=1.0 if variant == "gemma" else 0.0, ROUND_BEFORE_WEIGHT=variant != "gemma",
    )  # fmt: skip


def embedding_layer_norm_fwd(
    ids: list[torch.Tensor | None],
    tables: list[torch.Tensor],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    out: torch.Tensor | None = None,
    pdl: bool | None = None,
    id_maps: list[torch.Tensor | None] | None = None,
    positions_from: torch.Tensor | None = None,
    padding_idx: int = 0,
    past_length: int = 0,
) -> torch.Tensor:
    """layer_norm(tables[0][ids[0]] + tables[1][ids[1]] (+ tables[2][ids[2]])): an encoder's embeddings (words,
    token types, positions) gathered, summed in order (each sum rounded to the tables' dtype, as eager adds
    store it) and normalized in one kernel. Returns [batch, seq_len, n_cols] (or [seq_len, n_cols] for 1-D ids).

    ids: 2 or 3 integer tensors of shape [batch, seq_len] or [seq_len], broadcast together (BERT's position ids
    [1, seq_len]); tables: [rows, n_cols] each, columns contiguous, one dtype; weight, bias: [n_cols] or None.
    id_maps: None, or per lookup None or an integer tensor [map_len] or [1, map_len]: the row of tables[i] is
    then id_maps[i][ids[i]] (BERT's token types, a buffer read through the position ids).
    positions_from: token ids broadcasting with the ids; a lookup whose ids are None reads instead each token's
    position counted past padding in them: padding_idx for a padding_idx token, else padding_idx + past_length
    + the count of other tokens up to and including it in its row (RoBERTa's position ids).
    An id outside its table or map gives a row of NaN. Validated by tritonize.ops. out: an optional contiguous
    output of that shape. pdl: as in layer_norm_fwd.
    """
    counted = [i is None for i in ids]
    positions_from = positions_from if any(counted) else None
    given = [i for i in ids if i is not None] + ([positions_from] if positions_from is not None else [])
    shape = torch.broadcast_shapes(*(i.shape for i in given))
    batch, seq_len = (1, *shape) if len(shape) == 1 else shape
    n_cols = tables[0].shape[1]
    y = out if out is not None else tables[0].new_empty((*shape, n_cols))
    n_rows = batch * seq_len
    if n_rows == 0:
        return y
    ids = [None if i is None else i.expand(shape).reshape(batch, seq_len) for i in ids]  # broadcast: stride 0
    # the token ids positions are counted in; without counted lookups an unread stand-in
    source = ids[0] if positions_from is None else positions_from.expand(shape).reshape(batch, seq_len)
    ids = [source if i is None else i for i in ids]  # a counted lookup's ids pointer is never read
    maps = [m.reshape(-1) if m is not None else None for m in (id_maps or [None] * len(ids))]
    num_tables = len(tables)
    # an unused third lookup repeats the first; a missing map is never read (its ids stand in)
    ids, tables = ids + ids[:3 - num_tables], list(tables) + list(tables[:3 - num_tables])
    maps, counted = maps + [None] * (3 - num_tables), counted + [False] * (3 - num_tables)
    map_pointers = [m if m is not None else i for m, i in zip(maps, ids, strict=True)]
    block_size, rows_per_program, num_warps = launch_config(n_rows, n_cols)
    pdl = n_rows <= PDL_MAX_ROWS and pdl_supported(y.device) if pdl is None else pdl
    _embedding_layer_norm_kernel[(triton.cdiv(n_rows, rows_per_program),)](
        *ids, *map_pointers, *tables, y, weight, bias, source, *(stride for i in ids for stride in i.stride()),
        *source.stride(), padding_idx, past_length,
        *(m.shape[0] if m is not None else 0 for m in maps), *(m.stride(0) if m is not None else 0 for m in maps),
        *(t.shape[0] for t in tables), *(t.stride(0) for t in tables), n_rows, n_cols, seq_len, eps,
        NUM_TABLES=num_tables, HAS_MAP0=maps[0] is not None, HAS_MAP1=maps[1] is not None,
        HAS_MAP2=maps[2] is not None, POSITIONS0=counted[0], POSITIONS1=counted[1], POSITIONS2=counted[2],
        BLOCK_SEQ=BLOCK_SEQ, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, ROWS_PER_PROGRAM=rows_per_program, BLOCK_SIZE=block_size, PDL=pdl,
        num_warps=num_warps, launch_pdl=pdl,
    )  # fmt: skip
    return y
