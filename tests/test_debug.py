"""tritonize.debug: planted out-of-bounds bugs are caught with the right details, correct kernels pass.

Kernels with bugs are defined here; tensors are carved out of one pool with gaps between them, so an
overflow lands in known memory (a gap, or the next argument when a test wants a cross-tensor access).
"""

import os
import re
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy
import pytest
import torch
import triton
import triton.language as tl
from helpers import assert_close, run_python, sm90_ptx
from triton.runtime.errors import InterpreterError
from triton.runtime.interpreter import GridExecutor, InterpreterBuilder
from triton.tools.tensor_descriptor import TensorDescriptor

from tritonize import cli
from tritonize.debug import OutOfBoundsError, bounds_checked, check_kernel, compile_for_gpu
from tritonize.debug.check import SHAPES
from tritonize.kernels import reference
from tritonize.kernels.attention import flash_attention_fwd
from tritonize.kernels.common import interpreter_numpy_problem
from tritonize.kernels.linear import LinearConfig, linear_fwd
from tritonize.kernels.norm import rms_norm_fwd

GAP = 256  # elements between tensors carved from one pool


def caught(launch) -> OutOfBoundsError:
    """The OutOfBoundsError that launch() raises under bounds_checked()."""
    with pytest.raises(OutOfBoundsError) as info, bounds_checked():
        launch()
    return info.value


def separated(*sizes: int, adjacent: bool = False) -> list[torch.Tensor]:
    """Random fp32 tensors of the given sizes in one pool: GAP elements apart, or back to back."""
    gap = 0 if adjacent else GAP
    pool = torch.randn(sum(sizes) + gap * (len(sizes) + 1))
    views, start = [], gap
    for size in sizes:
        views.append(pool[start : start + size])
        start += size + gap
    return views


@triton.jit
def _copy_kernel(X_ptr, Y_ptr, n, MASK_LOAD: tl.constexpr, MASK_STORE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if MASK_LOAD:
        x = tl.load(X_ptr + offs, mask=offs < n, other=-1.0)
    else:
        x = tl.load(X_ptr + offs)
    if MASK_STORE:
        tl.store(Y_ptr + offs, x, mask=offs < n)
    else:
        tl.store(Y_ptr + offs, x)


@triton.jit
def _row_copy_kernel(X_ptr, Y_ptr, x_row_stride, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    x = tl.load(X_ptr + row * x_row_stride + cols, mask=cols < n_cols)
    tl.store(Y_ptr + row * n_cols + cols, x, mask=cols < n_cols)


@triton.jit
def _sum_blocks_kernel(X_ptr, Y_ptr, Out_ptr, n_blocks, BLOCK: tl.constexpr):
    """Out = sum over n_blocks blocks of x, plus y's first block; walks X_ptr block by block, unmasked."""
    offs = tl.arange(0, BLOCK)
    x_ptrs = X_ptr + offs
    acc = tl.load(Y_ptr + offs)
    for _ in range(n_blocks):
        acc += tl.load(x_ptrs)
        x_ptrs += BLOCK
    tl.store(Out_ptr + offs, acc)


@triton.jit
def _concat_kernel(X_ptr, Y_ptr, Out_ptr, n_x, n_total, BLOCK: tl.constexpr):
    """Out = cat(x, y) through one pointer block that points into x or y lane by lane."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ptrs = tl.where(offs < n_x, X_ptr + offs, Y_ptr + (offs - n_x))
    tl.store(Out_ptr + offs, tl.load(ptrs, mask=offs < n_total), mask=offs < n_total)


@triton.jit
def _count_kernel(Counts_ptr, n, MASK: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    if MASK:
        tl.atomic_add(Counts_ptr + offs % 4, 1.0, mask=offs < n)
    else:
        tl.atomic_add(Counts_ptr + offs, 1.0)


@triton.jit
def _block_ptr_copy_kernel(X_ptr, Y_ptr, n, CHECK: tl.constexpr, BLOCK: tl.constexpr):
    x_block = tl.make_block_ptr(X_ptr, (n,), (1,), (tl.program_id(0) * BLOCK,), (BLOCK,), (0,))
    y_block = tl.make_block_ptr(Y_ptr, (n,), (1,), (tl.program_id(0) * BLOCK,), (BLOCK,), (0,))
    if CHECK:
        tl.store(y_block, tl.load(x_block, boundary_check=(0,), padding_option="zero"), boundary_check=(0,))
    else:
        tl.store(y_block, tl.load(x_block), boundary_check=(0,))


@triton.jit
def _descriptor_copy_kernel(x_desc, Y_ptr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y_ptr + offs, x_desc.load([tl.program_id(0) * BLOCK]))


# -- correct kernels pass; masked-off lanes are never flagged -------------------------------------


def test_masked_lanes_past_the_end_are_not_flagged_and_other_fills_them():
    x, y = separated(100, 128)  # the grid covers 128 lanes; x has 100 elements
    with bounds_checked() as record:
        _copy_kernel[(4,)](x, y, 100, MASK_LOAD=True, MASK_STORE=False, BLOCK=32)
    assert record.launches == ["_copy_kernel"]
    assert torch.equal(y[:100], x)
    assert (y[100:] == -1.0).all()


def test_pointer_select_between_two_tensors_is_not_flagged():
    x, y, out = separated(40, 30, 70)
    with bounds_checked():
        _concat_kernel[(3,)](x, y, out, 40, 70, BLOCK=32)
    assert torch.equal(out, torch.cat([x, y]))


def test_block_pointer_with_boundary_check_passes():
    x, y = separated(100, 100)
    with bounds_checked():
        _block_ptr_copy_kernel[(4,)](x, y, 100, CHECK=True, BLOCK=32)
    assert torch.equal(y, x)


def test_masked_atomics_pass():
    (counts,) = separated(4)
    counts.zero_()
    with bounds_checked():
        _count_kernel[(1,)](counts, 10, MASK=True, BLOCK=16)
    assert counts.tolist() == [3.0, 3.0, 2.0, 2.0]


# -- planted bugs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("access", ["load", "store"])
def test_missing_tail_mask(access):
    x, y = separated(100, 100)
    masks = dict(MASK_LOAD=access != "load", MASK_STORE=access != "store")
    err = caught(lambda: _copy_kernel[(4,)](x, y, 100, **masks, BLOCK=32))
    assert (err.kernel, err.program_id, err.access) == ("_copy_kernel", (3, 0, 0), access)
    assert err.pointer == ("X_ptr" if access == "load" else "Y_ptr")
    assert err.offsets == tuple(range(100, 128))
    assert (err.extent, err.lands_in) == (100, ())
    assert "_copy_kernel" in str(err) and "program (3, 0, 0)" in str(err) and f"{err.pointer!r}" in str(err)


def test_wrong_stride():
    x, y = separated(6 * 10, 6 * 10)
    x = x.view(6, 10)
    # bug: a byte stride where the kernel wants elements; row 2 starts at element 80, past the 60 of x
    err = caught(lambda: _row_copy_kernel[(6,)](x, y, x.stride(0) * x.element_size(), 10, BLOCK=16))
    assert (err.kernel, err.program_id, err.access, err.pointer) == ("_row_copy_kernel", (2, 0, 0), "load", "X_ptr")
    assert (err.offsets, err.extent) == (tuple(range(80, 90)), 60)  # only the 10 unmasked columns


def test_one_program_too_many_in_the_grid():
    x, y = separated(128, 128)
    # n is a multiple of BLOCK, so the kernel has no masks, but the grid is off by one
    err = caught(lambda: _copy_kernel[(128 // 32 + 1,)](x, y, 128, MASK_LOAD=False, MASK_STORE=False, BLOCK=32))
    assert (err.program_id, err.pointer, err.offsets) == ((4, 0, 0), "X_ptr", tuple(range(128, 160)))


def test_pointer_walking_into_the_next_tensor_is_a_cross_tensor_access():
    x, y, out = separated(64, 32, 32, adjacent=True)  # y starts right where x ends
    err = caught(lambda: _sum_blocks_kernel[(1,)](x, y, out, 64 // 32 + 1, BLOCK=32))  # bug: one block too many
    assert (err.pointer, err.offsets, err.lands_in) == ("X_ptr", tuple(range(64, 96)), ("Y_ptr",))
    assert "cross-tensor" in str(err) and "'Y_ptr'" in str(err)


def test_unmasked_atomic():
    (counts,) = separated(4)
    err = caught(lambda: _count_kernel[(1,)](counts, 4, MASK=False, BLOCK=16))
    assert (err.access, err.pointer, err.offsets) == ("atomic", "Counts_ptr", tuple(range(4, 16)))


def test_block_pointer_without_boundary_check():
    x, y = separated(100, 100)
    err = caught(lambda: _block_ptr_copy_kernel[(4,)](x, y, 100, CHECK=False, BLOCK=32))
    assert (err.program_id, err.pointer, err.offsets) == ((3, 0, 0), "X_ptr", tuple(range(100, 128)))


def test_tensor_descriptor_larger_than_its_tensor():
    x, y = separated(100, 160)
    with bounds_checked():
        _descriptor_copy_kernel[(5,)](TensorDescriptor(x, [100], [1], [32]), y, BLOCK=32)
    assert torch.equal(y[:100], x) and (y[100:] == 0).all()  # reads past the descriptor's shape give zeros
    # bug: the descriptor claims 128 elements
    err = caught(lambda: _descriptor_copy_kernel[(5,)](TensorDescriptor(x, [128], [1], [32]), y, BLOCK=32))
    assert (err.program_id, err.pointer, err.offsets) == ((3, 0, 0), "x_desc", tuple(range(100, 128)))


# -- the hooks are scoped to the block ------------------------------------------------------------


def test_hooks_are_restored_and_blocks_do_not_nest():
    original = InterpreterBuilder.create_masked_load
    x, y = separated(100, 100)
    with pytest.raises(OutOfBoundsError), bounds_checked():
        assert InterpreterBuilder.create_masked_load is not original
        with pytest.raises(RuntimeError, match="already active"), bounds_checked():
            pass
        _copy_kernel[(4,)](x, y, 100, MASK_LOAD=False, MASK_STORE=True, BLOCK=32)
    assert InterpreterBuilder.create_masked_load is original


def test_compiled_kernel_runs_interpreted_inside_the_block(tmp_path):
    """A kernel decorated without TRITON_INTERPRET (a compiled JITFunction) is interpreted and checked too."""
    script = tmp_path / "compiled_kernel.py"
    script.write_text(textwrap.dedent("""
        import torch, triton, triton.language as tl
        from triton.runtime.jit import JITFunction
        from tritonize.debug import OutOfBoundsError, bounds_checked

        @triton.jit
        def add_one(X_ptr, n, BLOCK: tl.constexpr):
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            tl.store(X_ptr + offs, tl.load(X_ptr + offs, mask=offs < n) + 1.0, mask=offs < n)

        assert isinstance(add_one, JITFunction)
        x = torch.zeros(300)[:100]
        with bounds_checked():
            add_one[(4,)](x, 100, BLOCK=32)
        assert (x == 1).all()
        try:
            with bounds_checked():
                add_one[(5,)](x, 150, BLOCK=32)
        except OutOfBoundsError as err:
            print(err.kernel, err.program_id, err.pointer, err.offsets[0], err.offsets[-1])
    """))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["add_one", "(3,", "0,", "0)", "X_ptr", "100", "127"]


# -- tritonize's own kernels run clean ------------------------------------------------------------


def test_attention_with_key_padding_mask_runs_clean():
    q = torch.randn(2, 4, 37, 40)
    k, v = torch.randn(2, 2, 45, 40), torch.randn(2, 2, 45, 40)
    mask = torch.ones(2, 45, dtype=torch.bool)
    mask[1, 30:] = False
    with bounds_checked() as record:
        out = flash_attention_fwd(q, k, v, 0.15, False, mask)
    assert record.launches == ["_attention_fwd_kernel"]
    assert_close(out, reference.attention(q.double(), k.double(), v.double(), 0.15, False, mask), torch.float32)


@pytest.mark.parametrize(
    "M, config, launches",
    [
        (5, LinearConfig(16, 64, 64, group_m=1, split_k=4), ["_linear_kernel", "_split_k_reduce_kernel"]),
        (40, LinearConfig(64, 64, 32, persistent=True), ["_linear_persistent_kernel"]),
    ],
    ids=["split_k", "persistent_tensor_descriptors"],
)
@pytest.mark.skipif(interpreter_numpy_problem() is not None, reason=str(interpreter_numpy_problem()))
def test_linear_runs_clean(M, config, launches):
    x, weight = torch.randn(M, 200), torch.randn(72, 200) * 0.07
    bias, residual = torch.randn(72), torch.randn(M, 72)
    with bounds_checked() as record:
        out = linear_fwd(x, weight, bias, "silu", residual, config=config)
    assert record.launches == launches
    ref = reference.linear(x.double(), weight.double(), bias.double(), "silu", residual.double())
    assert_close(out, ref, torch.float32)


def test_an_interpreter_broken_by_numpy_is_named(monkeypatch):
    """Under numpy >= 2.4, Triton 3.6's interpreter fails inside any loop with a runtime bound (the device
    image has such a numpy): the block says so and what to install instead of a bare numpy TypeError."""
    def broken(executor, *args, **kwargs):
        raise InterpreterError(repr(TypeError("only 0-dimensional arrays can be converted to Python scalars")))

    monkeypatch.setattr(GridExecutor, "__call__", broken)
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.1")
    with pytest.raises(RuntimeError, match=r"bounds_checked: Triton 3.6.0's interpreter .* numpy 2.4.1; install "
                                           r"numpy<2.4") as caught, bounds_checked():
        rms_norm_fwd(torch.randn(2, 16), torch.randn(16), 1e-6)
    assert isinstance(caught.value.__cause__, InterpreterError)
    monkeypatch.setattr(numpy, "__version__", "2.3.5")  # another cause: the interpreter's own error, untouched
    with pytest.raises(InterpreterError), bounds_checked():
        rms_norm_fwd(torch.randn(2, 16), torch.randn(16), 1e-6)


def test_rms_norm_with_residual_runs_clean():
    x, residual, weight = torch.randn(7, 100), torch.randn(7, 100), torch.randn(100)
    with bounds_checked() as record:
        y, h = rms_norm_fwd(x, weight, 1e-6, residual)
    assert record.launches == ["_rms_norm_fwd_kernel"]
    ref_y, ref_h = reference.rms_norm(x.double(), weight.double(), 1e-6, residual.double())
    assert_close(y, ref_y, torch.float32)
    assert_close(h, ref_h, torch.float32)


@pytest.mark.parametrize(
    "kernel, shape",
    [("attention", (2, 3, 20, 33, 24, 1)), ("linear", (3, 50, 70)), ("layer_norm", (5, 33)), ("rms_norm", (4, 65))],
)
def test_check_kernel(kernel, shape):
    result = check_kernel(kernel, shape, causal=kernel == "attention", seed=1)
    assert result.ok, result
    assert result.launches


def test_check_kernel_rejects_a_bad_shape():
    with pytest.raises(ValueError, match="M,N,K"):
        check_kernel("linear", (3, 4))


def test_docs_example_runs(tmp_path, capsys):
    docs = (Path(__file__).resolve().parents[1] / "docs" / "debugging.md").read_text()
    example = tmp_path / "example.py"  # @triton.jit needs its source in a file
    example.write_text(re.findall(r"```python\n(.*?)```", docs, flags=re.S)[0])
    runpy.run_path(str(example))
    assert "kernel double_kernel, program (3, 0, 0): load through 'X_ptr'" in capsys.readouterr().out


# -- command line ---------------------------------------------------------------------------------


def test_cli_offers_every_kernel_check_kernel_knows():
    assert tuple(SHAPES) == cli.DEBUG_KERNELS


def test_cli_debug_linear(capsys):
    assert cli.main(["debug", "linear", "--shape", "33,40,70"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK linear") and "relative error" in out


def test_cli_debug_bad_shape(capsys):
    assert cli.main(["debug", "attention", "--shape", "2,3,4"]) == 2
    assert "batch,heads,q_len,kv_len,head_dim" in capsys.readouterr().out


# -- compile_for_gpu: a kernel compiled for sm_90 without a GPU ------------------------------------------------

NORM_TYPES = {name: "*fp16" for name in ("X_ptr", "R_ptr", "Y_ptr", "H_ptr", "W_ptr", "B_ptr")} | {"eps": "fp32"}
NORM_CONSTEXPRS = dict(HAS_RESIDUAL=False, STORE_SUM=False, HAS_WEIGHT=True, HAS_BIAS=False, ROWS_PER_PROGRAM=1,
                       BLOCK_SIZE=256, PDL=False)


def test_compile_for_gpu_gives_sm90_ptx():
    ptx = sm90_ptx("tritonize.kernels.norm", "_layer_norm_fwd_kernel", NORM_TYPES, NORM_CONSTEXPRS)
    assert ".target sm_90" in ptx and ".entry _layer_norm_fwd_kernel" in ptx
    assert "griddepcontrol" not in ptx  # PDL=False compiles no PDL instruction


def test_compile_for_gpu_names_unknown_arguments():
    script = ("from tritonize.debug import compile_for_gpu\nfrom tritonize.kernels import norm\n"
              f"compile_for_gpu(norm._layer_norm_fwd_kernel, {NORM_TYPES!r}, {{**{NORM_CONSTEXPRS!r}, 'BLOCK': 4}})")
    done = run_python("-c", script)
    assert done.returncode == 1 and "has no argument(s) ['BLOCK']" in done.stderr, done.stderr[-2000:]


@pytest.mark.skipif(not triton.knobs.runtime.interpret, reason="needs the interpreter on")
def test_compile_for_gpu_refuses_the_interpreter():
    from tritonize.kernels import norm

    with pytest.raises(RuntimeError, match="run without TRITON_INTERPRET=1"):
        compile_for_gpu(norm._layer_norm_fwd_kernel, NORM_TYPES, NORM_CONSTEXPRS)
