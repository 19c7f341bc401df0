"""The decode loop shared by every generation engine: select a token, feed it back, repeat, on the device.

One iteration = the model's `step` + token selection + bookkeeping, all on device tensors with fixed
shapes. On CUDA (cuda_graph=True) the first steps run eagerly on a side stream as the warm-up, then one
iteration is captured in a CUDA graph and replayed for the rest: no Python and no launch overhead per
token. The host reads "all sequences finished" only every `eos_check_every` steps; steps run past the
last eos only write pad tokens and are cut from the result, so the output has HF's length exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tritonize.generation.sampling import select_tokens

WARMUP_STEPS = 2  # eager steps on a side stream before capture (Triton compiles, allocator settles)


class _Iteration:
    """Device state of the loop and one token selection; every tensor keeps its address (graph-safe)."""

    def __init__(self, first_logits: torch.Tensor, max_new_tokens: int, min_new_tokens: int,
                 eos_token_ids: list[int] | None, pad_token_id: int | None, sampling: dict) -> None:
        batch, vocab = first_logits.shape
        device = first_logits.device
        self.sampling, self.min_new_tokens = sampling, min_new_tokens
        self.eos = None if eos_token_ids is None else torch.tensor(eos_token_ids, device=device)
        self.eos_mask = None
        if self.eos is not None and min_new_tokens > 0:
            self.eos_mask = torch.zeros(vocab, dtype=torch.bool, device=device)
            self.eos_mask[self.eos[self.eos < vocab]] = True  # an eos outside the vocabulary is never produced
        self.pad_token_id = pad_token_id
        self.tokens = torch.zeros((batch, max_new_tokens), dtype=torch.long, device=device)
        self.last_token = torch.zeros(batch, dtype=torch.long, device=device)  # what the next step feeds the model
        self.index = torch.zeros(1, dtype=torch.long, device=device)  # how many tokens were chosen so far
        self.unfinished = torch.ones(batch, dtype=torch.bool, device=device)
        self.steps_with_unfinished = torch.zeros((), dtype=torch.long, device=device)  # HF's output length

    def __call__(self, logits: torch.Tensor) -> None:
        if self.eos_mask is not None:  # HF's MinNewTokensLengthLogitsProcessor
            logits = logits.masked_fill(self.eos_mask & (self.index < self.min_new_tokens), float("-inf"))
        token = select_tokens(logits, **self.sampling)
        self.steps_with_unfinished += self.unfinished.any()
        if self.eos is not None:
            token = torch.where(self.unfinished, token, self.pad_token_id)
            self.unfinished &= ~torch.isin(token, self.eos)
        self.tokens.index_copy_(1, self.index, token[:, None])
        self.last_token.copy_(token)
        self.index += 1


def _check_args(first_logits, max_new_tokens, min_new_tokens, do_sample, temperature, top_k, top_p,
                eos_token_id, pad_token_id, eos_check_every, generator) -> None:
    if not isinstance(first_logits, torch.Tensor) or first_logits.dim() != 2 or not first_logits.is_floating_point():
        raise ValueError("first_logits must be a floating-point tensor [batch, vocab], got "
                         f"{getattr(first_logits, 'shape', type(first_logits).__name__)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not isinstance(min_new_tokens, int) or min_new_tokens < 0:
        raise ValueError(f"min_new_tokens must be an int >= 0, got {min_new_tokens!r}")
    if not isinstance(eos_check_every, int) or eos_check_every < 1:
        raise ValueError(f"eos_check_every must be an int >= 1, got {eos_check_every!r}")
    if do_sample:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
            raise ValueError(f"top_k must be an int >= 0 (0 or None: off), got {top_k!r}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    for name, ids in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        for token in [] if ids is None else [ids] if isinstance(ids, int) else ids:
            if not isinstance(token, int) or token < 0:
                raise ValueError(f"{name} must be an int >= 0 (or a list of them for eos), got {ids!r}")
    if generator is not None and generator.device.type != first_logits.device.type:
        raise ValueError(f"generator is on {generator.device} but the logits are on {first_logits.device}")


def _warm_up_and_capture(advance: Callable[[], None], generator: torch.Generator | None) -> Callable[[], None]:
    """Runs WARMUP_STEPS real steps on a side stream, then captures one more (not run) and returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP_STEPS):
            advance()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    if generator is not None:  # the default generator registers itself; others must be told
        graph.register_generator_state(generator)
    with torch.cuda.graph(graph):
        advance()
    return graph.replay


def decode_loop(
    step: Callable[[torch.Tensor], torch.Tensor],
    first_logits: torch.Tensor,
    *,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    cuda_graph: bool = True,
    eos_check_every: int = 8,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Generates up to max_new_tokens tokens per sequence; returns them, int64 [batch, n_new].

    first_logits [batch, vocab]: the logits after the last prompt token (from prefill). step(tokens):
    feeds int64 [batch] tokens to the model, which appends them to its own static caches and advances
    its own device-side lengths, and returns the next logits [batch, vocab]; it must be capturable in a
    CUDA graph (no host sync, fixed shapes). Selection follows HF generate: min_new_tokens blocks the
    eos tokens, then greedy argmax or sampling (temperature -> top-k -> top-p); a sequence that produced
    an eos emits pad_token_id (default: the first eos) from then on; generation stops once every sequence
    finished, and n_new is the number of steps HF would run (<= max_new_tokens). top_k 0 or None and
    top_p None or 1.0 switch those filters off. The host checks for the end every eos_check_every steps.
    """
    _check_args(first_logits, max_new_tokens, min_new_tokens, do_sample, temperature, top_k, top_p,
                eos_token_id, pad_token_id, eos_check_every, generator)
    eos_token_ids = [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or None
    if pad_token_id is None and eos_token_ids is not None:
        pad_token_id = eos_token_ids[0]  # as HF does, with a warning there
    sampling = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    with torch.no_grad():
        iteration = _Iteration(first_logits, max_new_tokens, min_new_tokens, eos_token_ids, pad_token_id, sampling)
        iteration(first_logits)

        def advance() -> None:
            iteration(step(iteration.last_token))

        steps = 1
        if cuda_graph and first_logits.is_cuda and max_new_tokens > 1 + WARMUP_STEPS:
            advance = _warm_up_and_capture(advance, generator)
            steps += WARMUP_STEPS
        while steps < max_new_tokens:
            if eos_token_ids is not None and steps % eos_check_every == 0 and not iteration.unfinished.any():
                break
            advance()
            steps += 1
        return iteration.tokens[:, : int(iteration.steps_with_unfinished)]
