"""Shape buckets and padding: a bounded set of (batch, sequence) shapes serves every input.

Inputs are padded up to their bucket (padding masked out through the attention mask) and outputs are
sliced back to the real rows and tokens. Must never import triton or transformers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# 2-D outputs that are per token (everything else 2-D, such as pooler_output, is per sequence).
PER_TOKEN_2D_OUTPUTS = ("start_logits", "end_logits")


def _powers_of_two(lo: int, hi: int) -> tuple[int, ...]:
    sizes, size = [], lo
    while size < hi:
        sizes.append(size)
        size *= 2
    return (*sizes, hi)


@dataclass(frozen=True)
class ShapeBuckets:
    """Allowed padded sizes per dimension, ascending; an input takes the smallest bucket that fits.

    Default: batch 1, 2, 4, ... up to max_batch; sequence 16, 32, 64, ... up to max_seq_len.
    """

    batch: tuple[int, ...]
    seq: tuple[int, ...]

    @classmethod
    def powers_of_two(cls, max_seq_len: int, max_batch: int = 64, min_seq: int = 16) -> ShapeBuckets:
        return cls(_powers_of_two(1, max_batch), _powers_of_two(min(min_seq, max_seq_len), max_seq_len))

    @classmethod
    def from_user(cls, buckets: dict[str, Sequence[int]] | ShapeBuckets, max_seq_len: int) -> ShapeBuckets:
        if isinstance(buckets, ShapeBuckets):
            return buckets
        unknown = set(buckets) - {"batch", "seq"}
        if unknown:
            raise ValueError(f"buckets takes the keys 'batch' and 'seq', got {sorted(unknown)}")
        default = cls.powers_of_two(max_seq_len)
        batch = tuple(sorted(int(b) for b in buckets.get("batch", default.batch)))
        seq = tuple(sorted(int(s) for s in buckets.get("seq", default.seq)))
        if not batch or not seq or batch[0] < 1 or seq[0] < 1:
            raise ValueError(f"bucket sizes must be positive integers, got batch={batch} seq={seq}")
        if seq[-1] > max_seq_len:
            raise ValueError(f"sequence bucket {seq[-1]} exceeds the model's maximum length {max_seq_len}")
        return cls(batch, seq)

    def fit(self, batch: int, seq: int) -> tuple[int, int]:
        """The bucket (padded batch, padded sequence) for an input, or ValueError naming the limit."""
        if batch > self.batch[-1]:
            raise ValueError(f"batch {batch} exceeds the largest batch bucket {self.batch[-1]}; "
                             f"pass buckets={{'batch': [...]}} to optimize_model to allow it")
        if seq > self.seq[-1]:
            raise ValueError(f"sequence length {seq} exceeds the largest sequence bucket {self.seq[-1]}")
        return next(b for b in self.batch if b >= batch), next(s for s in self.seq if s >= seq)


def pad_to(t: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """Zero-pads dims 0 and 1 of t up to (batch, seq): pad tokens, pad positions, masked-out keys."""
    pad_seq, pad_batch = seq - t.shape[1], batch - t.shape[0]
    if pad_seq == 0 and pad_batch == 0:
        return t
    trailing = [0, 0] * (t.dim() - 2)
    return F.pad(t, [*trailing, 0, pad_seq, 0, pad_batch])


def _unpadded(t: torch.Tensor, name: str, real: tuple[int, int], padded: tuple[int, int]) -> torch.Tensor:
    """t without the bucket's padding: rows past the real batch, and for per-token outputs (3-D and more, or the
    2-D ones named in PER_TOKEN_2D_OUTPUTS) positions past the real sequence."""
    (batch, seq), (padded_batch, padded_seq) = real, padded
    if batch != padded_batch and t.dim() >= 1 and t.shape[0] == padded_batch:
        t = t[:batch]
    per_token = t.dim() >= 3 or (t.dim() == 2 and name.endswith(PER_TOKEN_2D_OUTPUTS))
    return t[:, :seq] if seq != padded_seq and per_token and t.shape[1] == padded_seq else t


def unpadded_outputs(out, real: tuple[int, int], padded: tuple[int, int], copy: bool = False):
    """A (nested) model output with the padding cut off every tensor; its type kept. copy=True also copies each
    tensor (batched, see copy_into), so that a later replay cannot overwrite what the caller holds. The output
    is rebuilt once (an HF ModelOutput costs tens of microseconds to build), and returned as it is when
    nothing changes."""
    leaves: list[tuple[str, torch.Tensor]] = []
    _named_tensor_leaves(out, "", leaves)
    tensors = [_unpadded(t, name, real, padded) for name, t in leaves]
    if copy:
        copies = [torch.empty_like(t) for t in tensors]
        copy_into(copies, tensors)
        tensors = copies
    if all(new is old for new, (_, old) in zip(tensors, leaves, strict=True)):
        return out
    return _replace_leaves(out, iter(tensors))


def _named_tensor_leaves(out, name: str, leaves: list[tuple[str, torch.Tensor]]) -> None:
    """Appends (the key of the nearest enclosing dict, tensor) for every tensor of a (nested) output."""
    if isinstance(out, torch.Tensor):
        leaves.append((name, out))
    elif isinstance(out, dict):
        for key, value in out.items():
            _named_tensor_leaves(value, key, leaves)
    elif isinstance(out, (tuple, list)):
        for value in out:
            _named_tensor_leaves(value, name, leaves)


def _replace_leaves(out, replacements):
    """out with its tensors, in _named_tensor_leaves order, taken from the iterator `replacements`."""
    if isinstance(out, torch.Tensor):
        return next(replacements)
    if isinstance(out, dict):  # ModelOutput is an OrderedDict subclass that takes keyword arguments
        return type(out)(**{key: _replace_leaves(value, replacements) for key, value in out.items()})
    if isinstance(out, (tuple, list)):
        return type(out)(_replace_leaves(value, replacements) for value in out)
    return out


def copy_into(destinations: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """destinations[i].copy_(sources[i]) for every i, batched: on CUDA, tensors of one dtype and layout
    copy in one launch (torch._foreach_copy_) instead of one each, which shows on millisecond calls."""
    if destinations:
        torch._foreach_copy_(destinations, sources)
