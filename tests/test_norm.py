"""LayerNorm / RMSNorm kernels (optionally fused with the residual add) against the fp64 reference."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import triton
from helpers import LaunchRecorder, assert_close, assert_pdl_waits_first, poisoned, sm90_ptx

from tritonize import ops, tuning
from tritonize.kernels import linear as linear_module
from tritonize.kernels import norm as norm_module
from tritonize.kernels import reference
from tritonize.kernels.linear import LinearConfig
from tritonize.kernels.norm import _layer_norm_fwd_kernel, launch_config, layer_norm_fwd, rms_norm_fwd

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHAPES = [(m, n) for n in (1, 33, 257, 1000) for m in (1, 33)] + [(33, 4099)]
AFFINE = ("weight_bias", "weight", "none")


def _inputs(shape, dtype, device, with_residual, param_dtype=None, n_params=1):
    x = torch.randn(shape, dtype=dtype, device=device)
    residual = torch.randn(shape, dtype=dtype, device=device) if with_residual else None
    params = [torch.randn(shape[-1], dtype=param_dtype or dtype, device=device) for _ in range(n_params)]
    return x, residual, params


def _f64(t):
    return None if t is None else t.double()


def _check(outputs, refs, dtype, with_residual):
    (y, h), (y_ref, h_ref) = outputs, refs
    assert y.dtype == dtype
    assert_close(y, y_ref, dtype)
    if with_residual:
        assert h.dtype == dtype
        assert_close(h, h_ref, dtype)
    else:
        assert h is None


def _poisoned_outputs(x, with_residual):
    out = poisoned(x.shape, x.dtype, x.device)
    return out, poisoned(x.shape, x.dtype, x.device) if with_residual else None


# -- kernel level, NaN-poisoned outputs -----------------------------------------------------------


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_layer_norm_kernel(shape, dtype, with_residual, device):
    x, residual, (weight, bias) = _inputs(shape, dtype, device, with_residual, n_params=2)
    out, residual_out = _poisoned_outputs(x, with_residual)
    y, h = layer_norm_fwd(x, weight, bias, 1e-5, residual, out=out, residual_out=residual_out)
    assert y is out and h is residual_out
    refs = reference.layer_norm(x.double(), weight.double(), bias.double(), 1e-5, _f64(residual))
    _check((y, h), refs, dtype, with_residual)


@pytest.mark.parametrize("kernel", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sum_not_kept(kernel, dtype, device):
    """keep_sum=False: the norm of x + residual as before, and no h."""
    x, residual, params = _inputs((33, 257), dtype, device, True, n_params=2 if kernel == "layer_norm" else 1)
    out = poisoned(x.shape, dtype, device)
    if kernel == "layer_norm":
        y, h = layer_norm_fwd(x, *params, 1e-5, residual, out=out, keep_sum=False)
        y_ref, _ = reference.layer_norm(x.double(), *(p.double() for p in params), 1e-5, residual.double())
    else:
        y, h = rms_norm_fwd(x, *params, 1e-6, residual, "llama", out=out, keep_sum=False)
        y_ref, _ = reference.rms_norm(x.double(), params[0].double(), 1e-6, residual.double(), "llama")
    assert y is out and h is None
    assert_close(y, y_ref, dtype)


def test_pdl_on_up_to_max_rows(monkeypatch, device):
    """Where the GPU has PDL, the norm kernels take it on at most PDL_MAX_ROWS rows unless told (the launch
    mode is recorded, the kernel not run)."""
    monkeypatch.setattr(norm_module, "pdl_supported", lambda device: True)
    modes = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: modes.append((kwargs["PDL"], kwargs["launch_pdl"]))

    monkeypatch.setattr(norm_module, "_layer_norm_fwd_kernel", Recorder())
    monkeypatch.setattr(norm_module, "_rms_norm_fwd_kernel", Recorder())
    limit = norm_module.PDL_MAX_ROWS
    for rows, pdl in [(1, None), (limit, None), (limit + 1, None), (limit + 1, True), (1, False)]:
        x, _, (weight,) = _inputs((rows, 8), torch.float32, device, False)
        layer_norm_fwd(x, weight, None, 1e-5, pdl=pdl)
        rms_norm_fwd(x, weight, 1e-5, pdl=pdl)
    expected = [True, True, False, True, False]
    assert modes == [(mode, mode) for mode in expected for _ in range(2)]


@pytest.mark.parametrize("kernel", ["_layer_norm_fwd_kernel", "_rms_norm_fwd_kernel"])
def test_pdl_kernels_compile_for_sm90_and_wait_first(kernel):
    """With PDL each norm kernel compiles for sm_90 without a GPU and waits for the previous kernel before
    its first load (a residual row block of 2 x 1024 fp16 values, weight and bias)."""
    types = {name: "*fp16" for name in ("X_ptr", "R_ptr", "Y_ptr", "H_ptr", "W_ptr")}
    types["eps"] = "fp32"
    constexprs = dict(HAS_RESIDUAL=True, STORE_SUM=True, ROWS_PER_PROGRAM=2, BLOCK_SIZE=1024, PDL=True)
    if kernel == "_layer_norm_fwd_kernel":
        types["B_ptr"] = "*fp16"
        constexprs.update(HAS_WEIGHT=True, HAS_BIAS=True)
    else:
        constexprs.update(WEIGHT_OFFSET=0.0, ROUND_BEFORE_WEIGHT=True)
    assert_pdl_waits_first(sm90_ptx("tritonize.kernels.norm", kernel, types, constexprs))


# -- embeddings + LayerNorm ------------------------------------------------------------------------


def _embedding_reference(ids, tables, weight, bias, eps):
    """fp64 LayerNorm of the lookups summed in order, each sum rounded to the tables' dtype as eager's."""
    total = tables[0][ids[0]]
    for ids_i, table in zip(ids[1:], tables[1:], strict=True):
        total = total + table[ids_i]
    return reference.layer_norm(total.double(), _f64(weight), _f64(bias), eps)[0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, seq, hidden, tables, affine", [
    (3, 7, 40, 3, True),  # BERT: words [B, S], token types [B, S], positions [1, S]
    (1, 1, 33, 2, False),
    (2, 130, 96, 3, False),
    (None, 9, 24, 2, True),  # 1-D ids: [seq]
])
def test_embedding_layer_norm(batch, seq, hidden, tables, affine, dtype, device):
    """Gathers, sums and LayerNorm in one kernel against fp64 (sums rounded as eager's), into a NaN-poisoned
    output, with broadcast ids (positions over the batch, a stride-0 expanded token-type row) and int32 ids."""
    shape = (seq,) if batch is None else (batch, seq)
    vocab = (50, 2, 512)[:tables]
    weights = [(torch.randn(rows, hidden, device=device) + 2.0).to(dtype) for rows in vocab]  # a common offset
    ids = [torch.randint(0, 50, shape, device=device),
           torch.randint(0, 2, shape[-1:], device=device).expand(shape).to(torch.int32),
           torch.arange(seq, device=device)[None] if batch is not None else torch.arange(seq, device=device)][:tables]
    weight, bias = ((torch.randn(hidden, device=device).to(dtype), torch.randn(hidden, device=device).to(dtype))
                    if affine else (None, None))
    out = poisoned((*shape, hidden), dtype, device)
    y = norm_module.embedding_layer_norm_fwd(ids, weights, weight, bias, 1e-12, out=out)
    assert y is out
    assert_close(y, _embedding_reference(ids, weights, weight, bias, 1e-12), dtype)


def test_embedding_layer_norm_marks_an_id_outside_its_table(device):
    """An id past its table (or negative) gives that token a row of NaN, every other token its values."""
    tables = [torch.randn(10, 16, device=device), torch.randn(4, 16, device=device)]
    ids = [torch.tensor([[1, 10, 3], [2, 2, 2]], device=device), torch.tensor([[0, 1, 2], [3, -1, 0]], device=device)]
    y = norm_module.embedding_layer_norm_fwd(ids, tables, None, None, 1e-5)
    bad = torch.isnan(y).all(-1)
    assert bad.tolist() == [[False, True, False], [False, True, False]] and not torch.isnan(y[~bad]).any()
    good = [i.clamp(0, 3) for i in ids]
    expected = _embedding_reference(good, tables, None, None, 1e-5)
    assert_close(y[~bad], expected[~bad], torch.float32)


def test_embedding_layer_norm_reads_ids_through_a_map(device):
    """With an id map, the table row is map[ids] (BERT's token types read from a buffer through the position
    ids), the map [1, n] or [n]; an id outside the map, or a mapped id outside the table, gives a row of NaN."""
    batch, seq, hidden = 3, 11, 40
    tables = [torch.randn(rows, hidden, device=device) for rows in (50, 3, 64)]
    ids = [torch.randint(0, 50, (batch, seq), device=device), torch.arange(seq, device=device)[None] + 2,
           torch.arange(seq, device=device)[None]]
    type_map = torch.randint(0, 3, (1, 64), device=device)
    word_map = torch.randperm(50, device=device).to(torch.int32)  # 1-D, int32
    out = poisoned((batch, seq, hidden), torch.float32, device)
    weight, bias = torch.randn(hidden, device=device), torch.randn(hidden, device=device)
    maps = [word_map, type_map, None]
    y = norm_module.embedding_layer_norm_fwd(ids, tables, weight, bias, 1e-12, out=out, id_maps=maps)
    mapped = [word_map[ids[0]], type_map[0, ids[1]], ids[2]]
    assert_close(y, _embedding_reference(mapped, tables, weight, bias, 1e-12), torch.float32)
    ids[1][0, -1] = 64  # past the map
    type_map[0, 3] = 3  # past the table, read by position 1
    y = norm_module.embedding_layer_norm_fwd(ids, tables, None, None, 1e-12, id_maps=[None, type_map, None])
    bad = torch.isnan(y).all(-1)
    assert bad[:, [1, seq - 1]].all() and bad.sum() == 2 * batch and not torch.isnan(y[~bad]).any()


def _hf_roberta_positions(token_ids, padding_idx, past_length):
    """HF RoBERTa's create_position_ids_from_input_ids, as written there (the kernel's spec)."""
    mask = token_ids.ne(padding_idx).int()
    return ((torch.cumsum(mask, dim=1).type_as(mask) + past_length) * mask).long() + padding_idx


@pytest.mark.parametrize("batch, seq, past_length, padding_idx", [(3, 11, 0, 1), (2, 300, 3, 0), (1, 1, 0, 1)])
def test_embedding_layer_norm_counts_positions_past_padding(batch, seq, past_length, padding_idx, device):
    """Lookups without ids read each token's position counted past padding in the token ids (RoBERTa's position
    ids, here also through a token-type map as HF RoBERTa reads its types): padding anywhere in a row (left,
    inside, right), rows longer than one BLOCK_SEQ step, against fp64 into a NaN-poisoned output."""
    hidden = 24
    tokens = torch.randint(0, 5, (batch, seq), device=device)  # padding_idx is among them: pads inside rows too
    tokens[0, -min(3, seq - 1):] = padding_idx if seq > 1 else tokens[0, -1:]
    if batch > 1:
        tokens[1, :2] = padding_idx  # left padding
    tables = [torch.randn(rows, hidden, device=device) for rows in (5, 3, seq + past_length + padding_idx + 1)]
    type_map = torch.randint(0, 3, (1, tables[2].shape[0]), device=device)
    weight, bias = torch.randn(hidden, device=device), torch.randn(hidden, device=device)
    out = poisoned((batch, seq, hidden), torch.float32, device)
    y = norm_module.embedding_layer_norm_fwd([tokens, None, None], tables, weight, bias, 1e-12, out=out,
                                             id_maps=[None, type_map, None], positions_from=tokens.to(torch.int32),
                                             padding_idx=padding_idx, past_length=past_length)
    positions = _hf_roberta_positions(tokens, padding_idx, past_length)
    assert torch.equal(reference.counted_positions(tokens, padding_idx, past_length), positions)
    expected = _embedding_reference([tokens, type_map[0, positions], positions], tables, weight, bias, 1e-12)
    assert y is out
    assert_close(y, expected, torch.float32)


def test_embedding_layer_norm_compiles_for_sm90_and_waits_first():
    types = {name: "*fp16" for name in ("T0_ptr", "T1_ptr", "T2_ptr", "Y_ptr", "W_ptr", "B_ptr")}
    types.update({name: "*i64" for name in ("Ids0_ptr", "Ids1_ptr", "Ids2_ptr", "Map0_ptr", "Map1_ptr", "Map2_ptr",
                                            "Src_ptr")}, eps="fp32")
    constexprs = dict(NUM_TABLES=3, HAS_MAP0=False, HAS_MAP1=True, HAS_MAP2=False, POSITIONS0=False, POSITIONS1=True,
                      POSITIONS2=True, BLOCK_SEQ=norm_module.BLOCK_SEQ, HAS_WEIGHT=True, HAS_BIAS=True,
                      ROWS_PER_PROGRAM=2, BLOCK_SIZE=1024, PDL=True)
    assert_pdl_waits_first(sm90_ptx("tritonize.kernels.norm", "_embedding_layer_norm_kernel", types, constexprs))


def test_ops_embedding_layer_norm_checks_its_operands(device):
    ids, table = torch.zeros(2, 5, dtype=torch.long, device=device), torch.randn(8, 16, device=device)
    assert_close(ops.embedding_layer_norm([ids, ids], [table, table], None, None),
                 _embedding_reference([ids, ids], [table, table], None, None, 1e-5), torch.float32)
    with pytest.raises(ValueError, match="2 or 3"):
        ops.embedding_layer_norm([ids], [table], None, None)
    with pytest.raises(TypeError, match=r"ids\[1\] must be int32 or int64"):
        ops.embedding_layer_norm([ids, ids.float()], [table, table], None, None)
    with pytest.raises(TypeError, match=r"tables\[1\] has dtype torch.float16"):
        ops.embedding_layer_norm([ids, ids], [table, table.half()], None, None)
    with pytest.raises(ValueError, match=r"tables\[1\] must be \[rows, 16\]"):
        ops.embedding_layer_norm([ids, ids], [table, torch.randn(8, 12, device=device)], None, None)
    with pytest.raises(ValueError, match="do not broadcast"):
        ops.embedding_layer_norm([ids, ids[:, :3]], [table, table], None, None)
    with pytest.raises(ValueError, match="norm_weight must have shape"):
        ops.embedding_layer_norm([ids, ids], [table, table], torch.ones(12, device=device), None)
    with pytest.raises(ValueError, match="one entry per lookup"):
        ops.embedding_layer_norm([ids, ids], [table, table], None, None, id_maps=[None])
    with pytest.raises(ValueError, match=r"id_maps\[1\] must be an \[n\] or \[1, n\] tensor, got shape \(2, 5\)"):
        ops.embedding_layer_norm([ids, ids], [table, table], None, None, id_maps=[None, ids])
    with pytest.raises(TypeError, match=r"id_maps\[0\] must be int32 or int64, got torch.float32"):
        ops.embedding_layer_norm([ids, ids], [table, table], None, None, id_maps=[ids[0].float(), None])
    counted = ops.embedding_layer_norm([ids, None], [table, table], None, None, positions_from=ids + 3, padding_idx=3)
    assert_close(counted, _embedding_reference([ids, ids + 3], [table, table], None, None, 1e-5), torch.float32)
    with pytest.raises(ValueError, match="exactly when positions_from is given; got 1 None entries and positions_fr"):
        ops.embedding_layer_norm([ids, None], [table, table], None, None)
    with pytest.raises(ValueError, match="got 0 None entries and positions_from given"):
        ops.embedding_layer_norm([ids, ids], [table, table], None, None, positions_from=ids)
    with pytest.raises(TypeError, match="positions_from must be int32 or int64"):
        ops.embedding_layer_norm([ids, None], [table, table], None, None, positions_from=ids.float())
    with pytest.raises(ValueError, match="past_length must be >= 0"):
        ops.embedding_layer_norm([ids, None], [table, table], None, None, positions_from=ids, past_length=-1)
    with pytest.raises(ValueError, match="do not broadcast"):
        ops.embedding_layer_norm([ids, None], [table, table], None, None, positions_from=ids[:, :3])


def test_kernel_writes_no_sum_without_store_sum(device):
    """STORE_SUM=False leaves the h buffer as it was (the kernel saves that write, it does not just discard it)."""
    (n_rows, n_cols), dtype = (5, 40), torch.float32
    x, residual, (weight, bias) = _inputs((n_rows, n_cols), dtype, device, True, n_params=2)
    y, h = poisoned(x.shape, dtype, device), poisoned(x.shape, dtype, device)
    block_size, rows_per_program, num_warps = launch_config(n_rows, n_cols)
    _layer_norm_fwd_kernel[(triton.cdiv(n_rows, rows_per_program),)](
        x, residual, y, h, weight, bias, n_cols, n_cols, n_cols, n_cols, n_rows, n_cols, 1e-5,
        HAS_RESIDUAL=True, STORE_SUM=False, HAS_WEIGHT=True, HAS_BIAS=True, ROWS_PER_PROGRAM=rows_per_program,
        BLOCK_SIZE=block_size, PDL=False, num_warps=num_warps,
    )  # fmt: skip
    assert torch.isnan(h).all()
    assert_close(y, reference.layer_norm(x.double(), weight.double(), bias.double(), 1e-5, residual.double())[0],
                 dtype)


@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_kernel_affine_options(affine, dtype, device):
    x, residual, (weight, bias) = _inputs((33, 257), dtype, device, True, torch.float32, n_params=2)
    weight = None if affine == "none" else weight
    bias = bias if affine == "weight_bias" else None
    out, residual_out = _poisoned_outputs(x, True)
    outputs = layer_norm_fwd(x, weight, bias, 1e-5, residual, out=out, residual_out=residual_out)
    refs = reference.layer_norm(x.double(), _f64(weight), _f64(bias), 1e-5, residual.double())
    _check(outputs, refs, dtype, True)


@pytest.mark.parametrize("variant", reference.RMS_NORM_VARIANTS)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_kernel(shape, dtype, with_residual, variant, device):
    x, residual, (weight,) = _inputs(shape, dtype, device, with_residual)
    out, residual_out = _poisoned_outputs(x, with_residual)
    y, h = rms_norm_fwd(x, weight, 1e-6, residual, variant, out=out, residual_out=residual_out)
    assert y is out and h is residual_out
    refs = reference.rms_norm(x.double(), weight.double(), 1e-6, _f64(residual), variant)
    _check((y, h), refs, dtype, with_residual)


@pytest.mark.parametrize("variant", reference.RMS_NORM_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rms_norm_rounds_like_its_variant(dtype, variant, device):
    """Against the reference run in x's dtype (rounding where the variant rounds): nearly bit-equal."""
    x, residual, (weight,) = _inputs((33, 1000), dtype, device, True, torch.float32)
    y, _ = rms_norm_fwd(x, weight, 1e-6, residual, variant)
    y_ref, _ = reference.rms_norm(x, weight, 1e-6, residual, variant)
    assert (y != y_ref).float().mean().item() < 0.01


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp32_params_with_half_input(dtype, device):
    x, residual, (weight, bias) = _inputs((33, 1000), dtype, device, True, torch.float32, n_params=2)
    refs = reference.layer_norm(x.double(), weight.double(), bias.double(), 1e-5, residual.double())
    _check(layer_norm_fwd(x, weight, bias, 1e-5, residual), refs, dtype, True)
    refs = reference.rms_norm(x.double(), weight.double(), 1e-6, residual.double(), "llama")
    _check(rms_norm_fwd(x, weight, 1e-6, residual, "llama"), refs, dtype, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_strided_rows(dtype, device):
    """Rows of a slice x[:, :n] of a wider tensor are read in place through the row strides."""
    wide_x = torch.randn(33, 300, dtype=dtype, device=device)
    wide_residual = torch.randn(33, 280, dtype=dtype, device=device)
    x, residual = wide_x[:, :257], wide_residual[:, 5:262]
    weight, bias = torch.randn(257, device=device), torch.randn(257, device=device)
    refs = reference.layer_norm(x.double(), weight.double(), bias.double(), 1e-5, residual.double())
    _check(layer_norm_fwd(x, weight, bias, 1e-5, residual), refs, dtype, True)
    refs = reference.rms_norm(x.double(), weight.double(), 1e-6, residual.double(), "gemma")
    _check(rms_norm_fwd(x, weight, 1e-6, residual, "gemma"), refs, dtype, True)
    y = ops.rms_norm(x, weight, variant="t5")
    assert_close(y, reference.rms_norm(x.double(), weight.double(), 1e-6, None, "t5")[0], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_layer_norm_large_common_offset(dtype, device):
    """x = 1000 + noise: a one-pass E[x^2] - E[x]^2 variance is off by ~3e-2 here, two-pass by ~2e-5.

    fp32 gets 10x its usual tolerance: the fp32 mean of values near 1000 carries an error of that size
    (torch's own fp32 layer_norm shows the same 2e-5).
    """
    x = (1000 + torch.randn(33, 1000, device=device)).to(dtype)
    weight, bias = torch.randn(1000, device=device), torch.randn(1000, device=device)
    y, _ = layer_norm_fwd(x, weight, bias, 1e-5)
    ref = reference.layer_norm(x.double(), weight.double(), bias.double(), 1e-5)[0]
    assert_close(y, ref, dtype, scale=10.0 if dtype == torch.float32 else 1.0)


def test_empty_rows(device):
    x = torch.randn(0, 64, dtype=torch.float16, device=device)
    y, h = rms_norm_fwd(x, torch.ones(64, device=device), 1e-6, x.clone())
    assert y.shape == h.shape == (0, 64)
    assert ops.layer_norm(x.reshape(0, 1, 64), None, None).shape == (0, 1, 64)


# -- public ops -----------------------------------------------------------------------------------


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ops_layer_norm_3d(dtype, with_residual, device):
    x, residual, (weight, bias) = _inputs((2, 5, 257), dtype, device, with_residual, n_params=2)
    result = ops.layer_norm(x, weight, bias, 1e-5, residual=residual)
    refs = reference.layer_norm(x.double(), weight.double(), bias.double(), 1e-5, _f64(residual))
    _check(result if with_residual else (result, None), refs, dtype, with_residual)


@pytest.mark.parametrize("variant", reference.RMS_NORM_VARIANTS)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ops_rms_norm_3d(dtype, with_residual, variant, device):
    x, residual, (weight,) = _inputs((2, 5, 1000), dtype, device, with_residual)
    result = ops.rms_norm(x, weight, 1e-6, residual=residual, variant=variant)
    refs = reference.rms_norm(x.double(), weight.double(), 1e-6, _f64(residual), variant)
    _check(result if with_residual else (result, None), refs, dtype, with_residual)


def test_ops_bad_input(device):
    x = torch.randn(4, 64, device=device)
    weight = torch.ones(64, device=device)
    with pytest.raises(TypeError):
        ops.layer_norm(x.double(), weight, None)
    with pytest.raises(TypeError):
        ops.rms_norm(x.double(), weight)
    with pytest.raises(ValueError, match="weight"):
        ops.layer_norm(x, torch.ones(63, device=device), None)
    with pytest.raises(ValueError, match="weight"):
        ops.rms_norm(x, torch.ones(65, device=device))
    with pytest.raises(ValueError, match="residual"):
        ops.rms_norm(x, weight, residual=torch.randn(4, 63, device=device))
    with pytest.raises(ValueError, match="residual"):
        ops.layer_norm(x, weight, None, residual=torch.randn(5, 64, device=device))
    with pytest.raises(ValueError, match="16384"):
        ops.layer_norm(torch.randn(1, 16385, device=device), None, None)
    with pytest.raises(ValueError, match="variant"):
        ops.rms_norm(x, weight, variant="mistral")
    with pytest.raises(ValueError, match="eps"):
        ops.rms_norm(x, weight, -1e-6)
    with pytest.raises(ValueError, match="eps"):
        ops.layer_norm(x, weight, None, -1e-5)


def test_ops_rms_norm_compiles_fullgraph(device):
    x, residual, (weight,) = _inputs((2, 5, 257), torch.float16, device, True, torch.float32)

    def block(x, residual, weight):
        y, h = ops.rms_norm(x, weight, 1e-6, residual=residual)
        return y * 2, h

    compiled = torch.compile(block, backend="eager", fullgraph=True)
    y, h = compiled(x, residual, weight)
    y_ref, h_ref = reference.rms_norm(x.double(), weight.double(), 1e-6, residual.double())
    assert_close(y, 2 * y_ref, torch.float16)
    assert_close(h, h_ref, torch.float16)


def test_add_rms_norm_opcheck(device):
    x, residual, (weight,) = _inputs((3, 33), torch.float16, device, True, torch.float32)
    torch.library.opcheck(torch.ops.tritonize.add_rms_norm.default, (x, residual, weight, 1e-6, "gemma"))


# -- real sizes on a GPU --------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    "shape, dtype, with_residual",
    [
        ((4096, 4096), torch.float16, False),
        ((8192, 8192), torch.bfloat16, True),
        ((32768, 768), torch.float16, True),
        ((1024, 16384), torch.float16, True),
        ((512, 16384), torch.float32, True),
    ],
)
def test_real_sizes(shape, dtype, with_residual, device):
    x, residual, (weight, bias) = _inputs(shape, dtype, device, with_residual, n_params=2)
    out, residual_out = _poisoned_outputs(x, with_residual)
    outputs = layer_norm_fwd(x, weight, bias, 1e-5, residual, out=out, residual_out=residual_out)
    refs = reference.layer_norm(x.double(), weight.double(), bias.double(), 1e-5, _f64(residual))
    _check(outputs, refs, dtype, with_residual)
    out, residual_out = _poisoned_outputs(x, with_residual)
    outputs = rms_norm_fwd(x, weight, 1e-6, residual, "llama", out=out, residual_out=residual_out)
    refs = reference.rms_norm(x.double(), weight.double(), 1e-6, _f64(residual), "llama")
    _check(outputs, refs, dtype, with_residual)


# -- ops.linear_layer_norm: the product's route decides where the residual add runs ------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("route", ["cublas", "split", "unsplit"])
def test_linear_layer_norm_routes(route, bias, tmp_path, monkeypatch, device):
    """The tuning cache's choice for the product decides the launches. cuBLAS: the product (bias in addmm),
    then one norm kernel that adds the residual and stores no sum. A config splitting K: the tiled kernel,
    then the reduce of the partial sums, which adds the residual and normalizes (no norm kernel). An unsplit
    config: the residual in the tiled kernel's epilogue, then the norm kernel. All against the fp64
    reference, at odd sizes."""
    monkeypatch.setenv(tuning.ENV_PATH, str(tmp_path / "tuning.json"))
    card = torch.cuda.get_device_name() if device == "cuda" else "triton-interpreter"
    x, weight = torch.randn(3, 5, 40, device=device), torch.randn(24, 40, device=device) / 6
    b = torch.randn(24, device=device) if bias else None
    r, norm_weight, norm_bias = (torch.randn(3, 5, 24, device=device), torch.randn(24, device=device),
                                 torch.randn(24, device=device))
    entry = {"cublas": {"backend": ops.CUBLAS},
             "split": dataclasses.asdict(LinearConfig(16, 16, 16, group_m=1, split_k=2)),
             "unsplit": dataclasses.asdict(LinearConfig(16, 16, 16, group_m=1))}[route]
    tuning.cache().put("linear", card, f"M16 N24 K40 float32 none bias={bias} residual=True", entry)
    launches = []
    for module, name in ((linear_module, "_linear_kernel"), (linear_module, "_split_k_reduce_kernel"),
                         (norm_module, "_layer_norm_fwd_kernel")):
        monkeypatch.setattr(module, name, LaunchRecorder(getattr(module, name), name, launches))
    out = ops.linear_layer_norm(x, weight, b, r, norm_weight, norm_bias, 1e-6)
    assert [name for name, _ in launches] == {"cublas": ["_layer_norm_fwd_kernel"],
                        "split": ["_linear_kernel", "_split_k_reduce_kernel"],
                        "unsplit": ["_linear_kernel", "_layer_norm_fwd_kernel"]}[route]
    h = reference.linear(x.double(), weight.double(), None if b is None else b.double(), None, r.double())
    expected, _ = reference.layer_norm(h, norm_weight.double(), norm_bias.double(), 1e-6)
    assert out.shape == (3, 5, 24)
    assert_close(out, expected, torch.float32)


def test_linear_layer_norm_rejects_bad_operands(device):
    x, weight, r = torch.randn(4, 40, device=device), torch.randn(24, 40, device=device), torch.randn(4, 24,
                                                                                                     device=device)
    with pytest.raises(ValueError, match="residual must have the output's shape"):
        ops.linear_layer_norm(x, weight, None, r[:, :20], None, None)
    with pytest.raises(ValueError, match="norm_weight must have shape"):
        ops.linear_layer_norm(x, weight, None, r, torch.ones(40, device=device), None)
