"""Tensor-parallel generation over torch.distributed: launch one process per GPU with torchrun.

    # generate_tp.py, run as: torchrun --nproc-per-node 2 generate_tp.py
    import tritonize
    from tritonize import parallel

    rank, world_size = parallel.init_from_torchrun()   # NCCL on CUDA (one GPU per process), gloo on CPU
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.bfloat16).eval()  # on the CPU
    parallel.tensor_parallel(model)                     # this rank's shards go to cuda:LOCAL_RANK
    out = tritonize.generate(model, ids.cuda(), mask.cuda(), max_new_tokens=64)   # the same on every rank
    parallel.release(model)                             # graphs and buffers go before the process group
    torch.distributed.destroy_process_group()

Every rank runs the same script on the same prompts; the engine (generation/decoder.py) splits the heads
and the MLP columns and all-reduces after the attention output and the down projection of every block.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from tritonize.generation.api import ENGINE_ATTRIBUTE, check_causal_lm
from tritonize.generation.decoder import DecoderEngine

# NVLink multicast (NVLS) stays off: set before NCCL initialises
NVLINK_MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
LAUNCH_HINT = "launch one process per GPU with `torchrun --nproc-per-node N script.py`"
CHECKSUM_SAMPLES = 1024  # elements read from each parameter to check that every rank holds the same model


def init_from_torchrun() -> tuple[int, int]:
    """Initialises the default process group from torchrun's environment; returns (rank, world_size).

    CUDA: NCCL, with this process on GPU LOCAL_RANK (torch.cuda.set_device) and NVLink multicast off.
    CPU: gloo.
    """
    if "LOCAL_RANK" not in os.environ:
        raise RuntimeError(f"tritonize.parallel.init_from_torchrun: no LOCAL_RANK in the environment; {LAUNCH_HINT}")
    for name, value in NVLINK_MULTICAST_OFF.items():
        os.environ.setdefault(name, value)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)  # communicators built now, before any graph capture
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def _checksum(model: torch.nn.Module, device: torch.device) -> torch.Tensor:
    """A few numbers that differ between two different models: parameter count, sizes, sampled values."""
    params = list(model.parameters())
    samples = [p.detach().reshape(-1)[:: max(1, p.numel() // CHECKSUM_SAMPLES)].double().sum() for p in params]
    weighted = sum((i + 1) * s for i, s in enumerate(samples))
    return torch.tensor([len(params), sum(p.numel() for p in params), sum(samples), weighted],
                        dtype=torch.float64, device=device)


def _check_same_model(model: torch.nn.Module, group, device: torch.device) -> None:
    checksum = _checksum(model, device)
    low, high = checksum.clone(), checksum.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(low, high):  # the same on every rank, so every rank raises
        raise ValueError("tritonize.parallel.tensor_parallel: the ranks hold different models (parameters differ); "
                         "load the same checkpoint on every rank (random weights: the same seed)")


def tensor_parallel(model: torch.nn.Module, *, process_group=None, device: torch.device | str | None = None,
                    all_reduce: str = "auto"):
    """Shards an HF causal LM for tensor-parallel `tritonize.generate` over `process_group` (None: the default
    group); returns the model.

    Call it on every rank of the group with the same model (checked). Each rank copies its slices of the
    weights to `device` (default: cuda:LOCAL_RANK when CUDA is available, else the CPU); the HF model
    itself may stay on the CPU. The engine is cached on the model, so `tritonize.generate(model, ...)` runs
    tensor parallel unchanged, with inputs on `device`; every rank must make the same calls.

    all_reduce: how the ranks sum the attention and MLP outputs (generation/collectives.py): "auto" takes
    PyTorch's symmetric-memory one-shot all-reduce for small sums on CUDA (decode steps) and
    torch.distributed (NCCL, gloo) otherwise; "symmetric-memory" raises where that cannot be set up;
    "torch.distributed" always uses torch.distributed.all_reduce.
    """
    model = check_causal_lm(model)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("tritonize.parallel.tensor_parallel needs an initialised torch.distributed process group: "
                           f"call tritonize.parallel.init_from_torchrun() first and {LAUNCH_HINT}")
    if device is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    _check_same_model(model, process_group, device)
    engine = DecoderEngine(model, tp_rank=dist.get_rank(process_group), tp_size=dist.get_world_size(process_group),
                           process_group=process_group, device=device, all_reduce=all_reduce)
    setattr(model, ENGINE_ATTRIBUTE, engine)
    return model


def release(model: torch.nn.Module) -> None:
    """Drops the model's generation engine with its kept CUDA graphs (which captured this group's collectives)
    and its symmetric-memory buffer. Call it on every rank before `torch.distributed.destroy_process_group()`:
    a process group destroyed under live graphs holding its collectives can hang the exit."""
    engine = getattr(model, ENGINE_ATTRIBUTE, None)
    if engine is None:
        return
    engine.decode_graphs.clear()
    engine.prefill_graphs.clear()
    delattr(model, ENGINE_ATTRIBUTE)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
