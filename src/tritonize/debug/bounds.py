"""Bounds-checked Triton kernel runs on CPU: every load, store and atomic checked against the tensors passed in.

`bounds_checked()` wraps Triton 3.6's interpreter for the block only: GridExecutor records each launch's
tensor byte ranges and tags each pointer argument's type with its name (the interpreter carries types through
pointer arithmetic); InterpreterBuilder's masked load/store and atomics check the active lanes before touching
memory; JITFunction.run/__call__ run compiled kernels as InterpretedFunction. Never imports torch.fx or transformers.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import triton.language as tl
from triton.runtime import interpreter
from triton.runtime.interpreter import GridExecutor, InterpretedFunction, InterpreterBuilder, TensorHandle
from triton.runtime.jit import JITFunction
from triton.tools.tensor_descriptor import TensorDescriptor

from tritonize.kernels.common import interpreter_numpy_problem

__all__ = ["OutOfBoundsError", "BoundsCheck", "bounds_checked"]

_SHOWN_OFFSETS = 8  # offending offsets listed in the message (all of them are on the exception)
_ACTIVE = threading.Lock()  # one bounds_checked() block at a time: the hooks are process-wide
_NUMPY_SCALAR_ERROR = "only 0-dimensional arrays can be converted"  # how numpy >= 2.4 breaks the interpreter


class OutOfBoundsError(RuntimeError):
    """A load, store or atomic touched memory outside the tensor its pointer was derived from.

    kernel: the kernel's name; program_id: (x, y, z) of the program that did it; access: "load",
    "store" or "atomic"; pointer: the argument the pointer came from (None when that is unknown, e.g.
    after a pointer cast); offsets: the offending element offsets from that argument's first element
    (byte addresses when pointer is None); extent: elements from the first to one past the last
    element of the argument; lands_in: other tensor arguments the offending lanes fall into.
    """

    def __init__(
        self,
        kernel: str,
        program_id: tuple[int, int, int],
        access: str,
        pointer: str | None,
        offsets: tuple[int, ...],
        extent: int,
        lands_in: tuple[str, ...],
    ) -> None:
        self.kernel, self.program_id, self.access, self.pointer = kernel, program_id, access, pointer
        self.offsets, self.extent, self.lands_in = offsets, extent, lands_in
        shown = ", ".join(map(str, offsets[:_SHOWN_OFFSETS])) + (", ..." if len(offsets) > _SHOWN_OFFSETS else "")
        where = f"kernel {kernel}, program {program_id}: {access}"
        if pointer is None:
            message = f"{where} through a pointer of unknown origin at byte addresses [{shown}], outside every tensor"
        else:
            message = (
                f"{where} through {pointer!r} at element offsets [{shown}] ({len(offsets)} lanes), "
                f"outside its valid offsets [0, {extent})"
            )
        if lands_in:
            message += f"; cross-tensor access: they land in {', '.join(map(repr, lands_in))}"
        super().__init__(message)


class _ArgPointer(tl.pointer_type):
    """A pointer type that remembers the argument(s) it was derived from.

    Triton's interpreter carries a value's type through pointer arithmetic, splat, broadcast, reshape
    and the like, so the argument name rides along with every pointer made from it.
    """

    def __init__(self, ptr: tl.pointer_type, arg_names: tuple[str, ...]) -> None:
        super().__init__(ptr.element_ty, ptr.address_space, ptr.const)
        self.arg_names = arg_names


def _arg_names(handle: object) -> tuple[str, ...] | None:
    dtype = getattr(handle, "dtype", None)
    return dtype.arg_names if isinstance(dtype, _ArgPointer) else None


def _byte_range(tensor: object) -> tuple[int, int]:
    """[start, end) bytes from a tensor's first element to one past its last (any non-negative strides)."""
    tensor = interpreter._unwrap_tensor(tensor)
    start = tensor.data_ptr()
    if tensor.numel() == 0:
        return start, start
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True))
    return start, start + (last + 1) * tensor.element_size()


@dataclass
class _Launch:
    """One kernel launch: the byte range of each tensor argument, by argument name."""

    kernel: str
    names: dict[int, str] = field(default_factory=dict)  # id(host tensor) -> argument name
    ranges: dict[str, tuple[int, int]] = field(default_factory=dict)

    def add(self, name: str, arg: object) -> None:
        if isinstance(arg, tuple):
            for i, item in enumerate(arg):
                self.add(f"{name}[{i}]", item)
        elif isinstance(arg, TensorDescriptor):
            self.add(name, arg.base)
        elif hasattr(arg, "data_ptr"):
            self.names[id(arg)] = name
            self.ranges[name] = _byte_range(arg)


@dataclass
class BoundsCheck:
    """What a bounds_checked() block ran: the name of each kernel launch, in order."""

    launches: list[str] = field(default_factory=list)


class _Checker:
    """The hooks of one bounds_checked() block and the launch they are checking."""

    def __init__(self, record: BoundsCheck) -> None:
        self.record = record
        self.launch: _Launch | None = None
        self.interpreted: dict[Callable, InterpretedFunction] = {}

    # -- launches: record the tensor arguments, tag their pointers, surface our error --

    def wrap_call(self, original):
        def call(executor: GridExecutor, *args, **kwargs):
            try:
                return original(executor, *args, **kwargs)
            except Exception as err:
                cause: BaseException | None = err
                while cause is not None and not isinstance(cause, OutOfBoundsError):
                    cause = cause.__cause__
                if cause is not None:
                    raise cause from None
                if _NUMPY_SCALAR_ERROR in str(err) and (problem := interpreter_numpy_problem()) is not None:
                    raise RuntimeError(f"bounds_checked: {problem}") from err
                raise

        return call

    def wrap_init_args(self, original):
        def init_args_hst(executor: GridExecutor, args_dev, kwargs):
            args_hst, kwargs_hst = original(executor, args_dev, kwargs)
            self.launch = _Launch(executor.fn.__name__)
            self.record.launches.append(self.launch.kernel)
            for name, arg in (*zip(executor.arg_names, args_hst, strict=False), *kwargs_hst.items()):
                self.launch.add(name, arg)
            return args_hst, kwargs_hst

        return init_args_hst

    def wrap_implicit_cvt(self, original):
        def implicit_cvt(arg):
            converted = original(arg)
            name = self.launch.names.get(id(arg)) if self.launch is not None else None
            if name is not None and isinstance(converted, tl.tensor) and converted.type.is_ptr():
                converted.handle.dtype = _ArgPointer(converted.type, (name,))
                converted = tl.tensor(converted.handle, converted.handle.dtype)
            return converted

        return implicit_cvt

    @staticmethod
    def wrap_merge(original):
        """select / cat / join of pointers from different arguments: the result may point into either."""

        def merge(builder: InterpreterBuilder, *args):
            out = original(builder, *args)
            pointers = [a for a in args if isinstance(a, TensorHandle) and isinstance(a.dtype, tl.pointer_type)]
            if pointers and isinstance(out.dtype, tl.pointer_type):
                names = [_arg_names(p) for p in pointers]
                if None in names:
                    out.dtype = tl.pointer_type(out.dtype.element_ty, out.dtype.address_space, out.dtype.const)
                else:
                    out.dtype = _ArgPointer(out.dtype, tuple(dict.fromkeys(n for group in names for n in group)))
            return out

        return merge

    # -- memory accesses --

    def check(self, access: str, ptrs: TensorHandle, mask: TensorHandle | np.ndarray | None) -> None:
        launch = self.launch
        addresses = np.asarray(ptrs.data, dtype=np.uint64)
        if mask is not None:
            # block-pointer and tensor-descriptor accesses pass their masks as bare numpy arrays
            mask_data = mask.data if isinstance(mask, TensorHandle) else mask
            addresses = addresses[np.broadcast_to(np.asarray(mask_data, dtype=bool), addresses.shape)]
        addresses = addresses.ravel().astype(np.int64)
        if addresses.size == 0:
            return
        itemsize = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
        names = _arg_names(ptrs)
        allowed = names if names is not None else tuple(launch.ranges)
        inside = np.zeros(addresses.shape, dtype=bool)
        for name in allowed:
            start, end = launch.ranges[name]
            inside |= (addresses >= start) & (addresses + itemsize <= end)
        if inside.all():
            return
        bad = np.unique(addresses[~inside])
        lands_in = tuple(
            name
            for name, (start, end) in launch.ranges.items()
            if name not in allowed and ((bad >= start) & (bad < end)).any()
        )
        program_id = tuple(int(i) for i in interpreter.interpreter_builder.grid_idx)
        if names is None:
            raise OutOfBoundsError(launch.kernel, program_id, access, None, tuple(map(int, bad)), 0, lands_in)
        start, end = launch.ranges[names[0]]
        offsets = tuple(int(o) for o in (bad - start) // itemsize)
        extent = (end - start) // itemsize
        raise OutOfBoundsError(launch.kernel, program_id, access, names[0], offsets, extent, lands_in)

    def wrap_masked_load(self, original):
        def create_masked_load(builder: InterpreterBuilder, ptrs, mask, *args, **kwargs):
            self.check("load", ptrs, mask)
            return original(builder, ptrs, mask, *args, **kwargs)

        return create_masked_load

    def wrap_masked_store(self, original):
        def create_masked_store(builder: InterpreterBuilder, ptrs, value, mask, *args, **kwargs):
            self.check("store", ptrs, mask)
            return original(builder, ptrs, value, mask, *args, **kwargs)

        return create_masked_store

    def wrap_atomic_rmw(self, original):
        def create_atomic_rmw(builder: InterpreterBuilder, rmw_op, ptr, val, mask, *args, **kwargs):
            self.check("atomic", ptr, mask)
            return original(builder, rmw_op, ptr, val, mask, *args, **kwargs)

        return create_atomic_rmw

    def wrap_atomic_cas(self, original):
        def create_atomic_cas(builder: InterpreterBuilder, ptr, *args, **kwargs):
            self.check("atomic", ptr, None)
            return original(builder, ptr, *args, **kwargs)

        return create_atomic_cas

    # -- compiled kernels (TRITON_INTERPRET unset at decoration) run through the interpreter too --

    def as_interpreted(self, jit_fn: JITFunction) -> InterpretedFunction:
        # keyed by the Python function: hashing a JITFunction walks its dependencies, which fails while
        # the interpreter has patched triton.language
        if jit_fn.fn not in self.interpreted:
            self.interpreted[jit_fn.fn] = InterpretedFunction(jit_fn.fn)
            self.interpreted[jit_fn.fn].pre_run_hooks = jit_fn.pre_run_hooks
        return self.interpreted[jit_fn.fn]

    def wrap_jit_run(self, _original):
        def run(jit_fn: JITFunction, *args, grid, warmup, **kwargs):
            return self.as_interpreted(jit_fn).run(*args, grid=grid, warmup=warmup, **kwargs)

        return run

    def wrap_jit_call(self, _original):
        def call(jit_fn: JITFunction, *args, **kwargs):
            return self.as_interpreted(jit_fn)(*args, **kwargs)

        return call

    def patches(self):
        """(object, attribute, wrapper factory) for every hook."""
        return (
            (GridExecutor, "__call__", self.wrap_call),
            (GridExecutor, "_init_args_hst", self.wrap_init_args),
            (interpreter, "_implicit_cvt", self.wrap_implicit_cvt),
            (InterpreterBuilder, "create_select", self.wrap_merge),
            (InterpreterBuilder, "create_cat", self.wrap_merge),
            (InterpreterBuilder, "create_join", self.wrap_merge),
            (InterpreterBuilder, "create_masked_load", self.wrap_masked_load),
            (InterpreterBuilder, "create_masked_store", self.wrap_masked_store),
            (InterpreterBuilder, "create_atomic_rmw", self.wrap_atomic_rmw),
            (InterpreterBuilder, "create_atomic_cas", self.wrap_atomic_cas),
            (JITFunction, "run", self.wrap_jit_run),
            (JITFunction, "__call__", self.wrap_jit_call),
        )


@contextlib.contextmanager
def bounds_checked() -> Iterator[BoundsCheck]:
    """Runs every Triton kernel launched inside the block through the interpreter, bounds-checked.

    Each load, store and atomic is checked, before it touches memory, against the [start, end) bytes
    of the tensor argument its pointer was derived from; lanes whose mask is false are skipped.
    Kernels decorated without TRITON_INTERPRET=1 are run interpreted for the duration too.
    Raises OutOfBoundsError at the first bad access. Yields a BoundsCheck listing the launches.
    Not reentrant, and the hooks are process-wide: launch kernels from one thread inside the block.
    """
    if not _ACTIVE.acquire(blocking=False):
        raise RuntimeError("bounds_checked() is already active (blocks cannot nest or run in parallel threads)")
    record = BoundsCheck()
    checker = _Checker(record)
    saved = []
    try:
        for obj, name, wrap in checker.patches():
            original = getattr(obj, name)
            saved.append((obj, name, original))
            setattr(obj, name, wrap(original))
        yield record
    finally:
        for obj, name, original in reversed(saved):
            setattr(obj, name, original)
        _ACTIVE.release()
