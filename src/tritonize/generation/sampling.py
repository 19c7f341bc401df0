"""Token selection on the device, without host syncs (so one CUDA graph can hold it).

The filters follow HF transformers' logits warpers exactly, in HF's order: temperature, then top-k
(ties with the k-th logit kept), then top-p (HF's definition: drop the tokens whose cumulative
probability, summed from the least likely, stays <= 1 - top_p; the most likely token always stays).
Sampling uses the exponential race, argmax(probs / E) with E ~ Exp(1) i.i.d., which draws from
`probs` exactly like torch.multinomial but with a fixed-shape `exponential_` draw that CUDA graphs
capture (the generator's philox offset advances on every replay).
"""

from __future__ import annotations

import torch


def apply_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Logits below the k-th largest of each row set to -inf (HF's TopKLogitsWarper)."""
    top_k = min(top_k, logits.shape[-1])
    kth_largest = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """HF's TopPLogitsWarper (min_tokens_to_keep=1): keeps the most likely tokens whose mass first exceeds top_p."""
    sorted_logits, sorted_indices = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    sorted_remove = cumulative <= (1 - top_p)
    sorted_remove[..., -1:] = False
    remove = sorted_remove.scatter(-1, sorted_indices, sorted_remove)
    return logits.masked_fill(remove, float("-inf"))


def filter_logits(
    logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """The logits that sampling draws from: temperature, top-k, top-p, in HF's order; filtered tokens are -inf."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    if top_k:
        logits = apply_top_k(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = apply_top_p(logits, top_p)
    return logits


def select_tokens(
    logits: torch.Tensor,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token of each row of logits [batch, vocab], int64 [batch]: argmax, or a sample of the filtered ones."""
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p).softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(torch.finfo(probs.dtype).tiny)
    return (probs / noise).argmax(dim=-1)
