"""The collectives of tensor-parallel generation: the sum over ranks after each attention block and MLP, and the
gather of the vocabulary-parallel logits.

A decode step's sums are small ([batch, 1, hidden]: 8 KB to 512 KB) and there are two per layer, so their
latency decides the step time. They go through PyTorch's symmetric-memory one-shot all-reduce
(`torch.ops.symm_mem.one_shot_all_reduce_copy_out`: one kernel copies this rank's tensor into a buffer
every rank mapped, waits for its peers, reads their buffers over NVLink and sums), which PyTorch measures
ahead of NCCL's ring below ~400 KB. Larger sums (prefill), CPU tensors, gloo groups and any setup failure
use `torch.distributed.all_reduce`. Both are capturable in CUDA graphs. NVLink multicast (multimem) is
never used.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

logger = logging.getLogger("tritonize")

ALL_REDUCE_METHODS = ("auto", "symmetric-memory", "torch.distributed")
SYMMETRIC_MEMORY_BYTES = 512 * 1024  # the one-shot buffer: sums up to this size take it


class RankCollectives:
    """Sum and gather over `process_group` (None: the default group) for tensors of `dtype` on `device`.

    all_reduce: "auto" (symmetric memory where it can be set up, else torch.distributed), "symmetric-memory"
    (raise if it cannot be set up) or "torch.distributed" (NCCL / gloo only). Construct it on every rank of
    the group at the same point: setting up symmetric memory is itself a collective.
    """

    def __init__(self, process_group, device: torch.device, dtype: torch.dtype, all_reduce: str = "auto") -> None:
        if all_reduce not in ALL_REDUCE_METHODS:
            raise ValueError(f"all_reduce must be one of {', '.join(ALL_REDUCE_METHODS)}, got {all_reduce!r}")
        self.group = process_group or dist.group.WORLD
        self.buffer: torch.Tensor | None = None
        self.method = "torch.distributed"
        if all_reduce == "torch.distributed":
            return
        reason = self._symmetric_memory_unsupported(device)
        if reason is None:
            try:
                self._set_up_symmetric_memory(device, dtype)
            except (RuntimeError, AttributeError) as err:  # an old PyTorch, a driver without P2P, ...
                reason = f"setting up symmetric memory failed: {err}"
        if reason is not None:
            if all_reduce == "symmetric-memory":
                raise RuntimeError(f"tritonize tensor parallel: all_reduce='symmetric-memory' impossible: {reason}")
            logger.info("tritonize tensor parallel: all-reduce through torch.distributed (%s)", reason)

    def _symmetric_memory_unsupported(self, device: torch.device) -> str | None:
        if device.type != "cuda":
            return f"tensors on {device}, not CUDA"
        if dist.get_backend(self.group) != "nccl":
            return f"process group backend {dist.get_backend(self.group)}, not nccl"
        if not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out"):
            return f"PyTorch {torch.__version__} has no symm_mem.one_shot_all_reduce_copy_out"
        return None

    def _set_up_symmetric_memory(self, device: torch.device, dtype: torch.dtype) -> None:
        from torch.distributed import _symmetric_memory as symmetric_memory

        buffer = symmetric_memory.empty(SYMMETRIC_MEMORY_BYTES // dtype.itemsize, dtype=dtype, device=device)
        symmetric_memory.rendezvous(buffer, self.group.group_name)
        self.buffer, self.method = buffer, "symmetric-memory one-shot"

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of x over the ranks (x may be overwritten with it)."""
        buffer = self.buffer
        if (buffer is not None and x.dtype == buffer.dtype and x.numel() <= buffer.numel() and x.is_contiguous()
                and x.numel() * x.element_size() % 16 == 0):
            out = torch.empty_like(x)
            staging = buffer[: x.numel()].view_as(x)
            return torch.ops.symm_mem.one_shot_all_reduce_copy_out(staging, x, "sum", self.group.group_name, out)
        dist.all_reduce(x, group=self.group)
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, n] from every rank -> [rows, world_size * n], rank 0's columns first."""
        world, (rows, n) = dist.get_world_size(self.group), x.shape
        parts = x.new_empty((world * rows, n))  # rank r's rows at r * rows (gloo wants this 2-D layout)
        dist.all_gather_into_tensor(parts, x.contiguous(), group=self.group)
        return parts.view(world, rows, n).permute(1, 0, 2).reshape(rows, world * n)
