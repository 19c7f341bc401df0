"""The decode loop shared by every generation engine: select a token, feed it back, repeat, on the device.

One iteration = the model's `step` + token selection + bookkeeping, all on device tensors with fixed
shapes. On CUDA (cuda_graph=True) the first steps run eagerly on a side stream as the warm-up, then one
iteration is captured in a CUDA graph and replayed for the rest: no Python and no launch overhead per
token. The host reads "all sequences finished" only every `eos_check_every` steps; steps run past the
last eos only write pad tokens and are cut from the result, so the output has HF's length exactly.

An engine whose step reads and writes only tensors that keep their addresses across calls passes a
`DecodeGraphCache`: the loop's device state and its captured graph are then kept, keyed by everything
the capture bakes in, and a later call with the same key resets the state in place and replays the
graph from its first step (no warm-up, no capture).

The work before the loop (the decoder's prefill, T5's encoder) is kept the same way by a
`PromptGraphCache`: static input buffers per (batch, prompt length rounded up to PROMPT_LENGTH_MULTIPLE),
padded with masked positions, and on CUDA the CUDA graph of the engine's set-up over them, captured into
the decode graphs' memory pool.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from tritonize.generation.sampling import select_tokens

WARMUP_STEPS = 2  # eager steps on a side stream before capture (Triton compiles, allocator settles)
TOKEN_CAPACITY_MULTIPLE = 64  # the tokens buffer holds max_new_tokens rounded up: nearby lengths share a graph
MAX_CACHED_LOOPS = 8  # captured loops an engine keeps (least recently used dropped first)
PROMPT_LENGTH_MULTIPLE = 64  # prompts are padded up to a multiple of this: nearby lengths share a prefill graph
MAX_CACHED_PROMPT_GRAPHS = 8  # prompt buckets (buffers, graph) an engine keeps (least recently used dropped first)

Output = TypeVar("Output")
Value = TypeVar("Value")


def round_up(length: int, multiple: int) -> int:
    """length rounded up to a multiple of `multiple` (the lengths of every kept buffer and bucket)."""
    return -(-length // multiple) * multiple


class _RecentlyUsed(OrderedDict[tuple, Value]):
    """A dict keeping its `limit` most recently used entries (the least recently used dropped first)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def use(self, key: tuple) -> Value | None:
        """The entry of key, now the most recently used; None if there is none."""
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value

    def add(self, key: tuple, value: Value) -> Value:
        self[key] = value
        if len(self) > self.limit:
            self.popitem(last=False)
        return value


class _Iteration:
    """Device state of the loop and one token selection; every tensor keeps its address (graph-safe)."""

    def __init__(self, first_logits: torch.Tensor, token_capacity: int, min_new_tokens: int,
                 eos_token_ids: list[int] | None, pad_token_id: int | None, sampling: dict) -> None:
        batch, vocab = first_logits.shape
        device = first_logits.device
        self.sampling = sampling
        # a device value, not a constant of the captured graph: calls differing only in it share the graph
        self.min_new_tokens = torch.tensor(min_new_tokens, device=device)
        self.eos = None if eos_token_ids is None else torch.tensor(eos_token_ids, device=device)
        self.eos_mask = None
        if self.eos is not None:
            self.eos_mask = torch.zeros(vocab, dtype=torch.bool, device=device)
            self.eos_mask[self.eos[self.eos < vocab]] = True  # an eos outside the vocabulary is never produced
        self.pad_token_id = pad_token_id
        self.tokens = torch.zeros((batch, token_capacity), dtype=torch.long, device=device)
        self.last_token = torch.zeros(batch, dtype=torch.long, device=device)  # what the next step feeds the model
        self.index = torch.zeros(1, dtype=torch.long, device=device)  # how many tokens were chosen so far
        self.unfinished = torch.ones(batch, dtype=torch.bool, device=device)
        self.steps_with_unfinished = torch.zeros((), dtype=torch.long, device=device)  # HF's output length

    def reset(self, min_new_tokens: int) -> None:
        """Back to no token chosen, in place. tokens keeps the last call's values: each call reads back only
        the columns it wrote, and last_token is set by the first selection."""
        self.min_new_tokens.fill_(min_new_tokens)
        self.index.zero_()
        self.unfinished.fill_(True)
        self.steps_with_unfinished.zero_()

    def __call__(self, logits: torch.Tensor) -> None:
        if self.eos_mask is not None:  # HF's MinNewTokensLengthLogitsProcessor
            logits = logits.masked_fill(self.eos_mask & (self.index < self.min_new_tokens), float("-inf"))
        token = select_tokens(logits, **self.sampling)
        self.steps_with_unfinished += self.unfinished.any()
        if self.eos is not None:
            token = torch.where(self.unfinished, token, self.pad_token_id)
            self.unfinished &= (token[:, None] != self.eos).all(dim=1)
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


@dataclass
class _Loop:
    """A loop's device state and, once captured, the replay of one iteration of it."""

    iteration: _Iteration
    replay: Callable[[], None] | None = None


class DecodeGraphCache:
    """The decode loops of one engine, with their CUDA graphs, for reuse across calls (least recently used
    dropped beyond MAX_CACHED_LOOPS). Every graph is captured into one memory pool, which the engine's
    `PromptGraphCache` shares: the graphs replay one at a time on one stream and keep nothing in the pool
    between replays (their state lives in the loop's and the engine's own buffers; a prompt graph's output
    is read before the next replay), so they can share their temporaries. The owner calls `clear` when the
    buffers its step reads move (caches reallocated): the graphs would read the old memory.
    """

    def __init__(self) -> None:
        self._loops: _RecentlyUsed[_Loop] = _RecentlyUsed(MAX_CACHED_LOOPS)
        self._pool = None  # torch.cuda.graph_pool_handle(), made at the first capture

    def __len__(self) -> int:
        return len(self._loops)

    def memory_pool(self) -> object:
        """The engine's CUDA graph memory pool (made on first use), shared with its `PromptGraphCache`."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    def clear(self) -> None:
        self._loops.clear()

    def get(self, key: tuple) -> _Loop | None:
        return self._loops.use(key)

    def put(self, key: tuple, loop: _Loop) -> None:
        self._loops.add(key, loop)


def warm_up_and_capture(run: Callable[[], Output], *, warmup_runs: int, pool: object,
                        generator: torch.Generator | None = None) -> tuple[torch.cuda.CUDAGraph, Output]:
    """Calls `run` warmup_runs times on a side stream (Triton compiles, NCCL communicators are set up, the
    allocator settles), then captures one more call (not run) into `pool` (None: a private one). Returns the
    graph and what the captured call returned: its output tensors, which every replay rewrites in place.
    generator: a non-default generator the captured work draws from."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup_runs):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    if generator is not None:  # the default generator registers itself; others must be told
        graph.register_generator_state(generator)
    with torch.cuda.graph(graph, pool=pool):
        output = run()
    return graph, output


@dataclass
class _PromptBucket:
    """A prompt bucket's static input buffers and, once captured, its graph and the graph's output."""

    inputs: tuple[torch.Tensor, ...]
    graph: torch.cuda.CUDAGraph | None = None
    output: torch.Tensor | None = None


class PromptGraphCache:
    """An engine's set-up work before the decode loop (prefill, encoder), `forward(*inputs) -> logits`, run on
    static input buffers kept per key (batch, padded length, ...), and on CUDA replayed from one CUDA graph
    per key. At most MAX_CACHED_PROMPT_GRAPHS keys are kept (least recently used dropped first).

    The graphs are captured into the decode graphs' memory pool: every graph of the engine replays on one
    stream, one at a time, and the only thing a graph leaves in the pool for later is its output, which the
    caller reads before the engine replays another graph (the output's memory may then be reused). The
    owner calls `clear` whenever the buffers `forward` reads or writes move (caches reallocated).
    """

    def __init__(self, forward: Callable[..., torch.Tensor], decode_graphs: DecodeGraphCache) -> None:
        self.forward, self._decode_graphs = forward, decode_graphs
        self._buckets: _RecentlyUsed[_PromptBucket] = _RecentlyUsed(MAX_CACHED_PROMPT_GRAPHS)

    def __len__(self) -> int:
        return len(self._buckets)

    def clear(self) -> None:
        self._buckets.clear()

    def run(self, key: tuple, allocate_inputs: Callable[[], tuple[torch.Tensor, ...]],
            fill_inputs: Callable[..., None], graphed: bool) -> torch.Tensor:
        """fill_inputs(*inputs) on key's input buffers (made by allocate_inputs() on the key's first use),
        then forward(*inputs): eagerly, or (graphed) by replaying the key's CUDA graph, captured on its first
        graphed use after one eager warm-up run. A graph's output is its own buffer: valid until the engine
        replays a graph again (this one or another, decode steps included); clone it to keep it."""
        bucket = self._buckets.use(key)
        if bucket is None:
            bucket = self._buckets.add(key, _PromptBucket(allocate_inputs()))
        fill_inputs(*bucket.inputs)
        if not graphed:
            return self.forward(*bucket.inputs)
        if bucket.graph is None:
            bucket.graph, bucket.output = warm_up_and_capture(
                lambda: self.forward(*bucket.inputs), warmup_runs=1, pool=self._decode_graphs.memory_pool())
        bucket.graph.replay()
        return bucket.output


def bucket_length(length: int) -> int:
    """`length` rounded up to PROMPT_LENGTH_MULTIPLE: the padded length of a prompt's bucket."""
    return round_up(length, PROMPT_LENGTH_MULTIPLE)


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
    graph_cache: DecodeGraphCache | None = None,
) -> torch.Tensor:
    """Generates up to max_new_tokens tokens per sequence; returns them, int64 [batch, n_new].

    first_logits [batch, vocab]: the logits after the last prompt token (from prefill). step(tokens):
    feeds int64 [batch] tokens to the model, which appends them to its own static caches and advances
    its own device-side lengths, and returns the next logits [batch, vocab]; it must be capturable in a
    CUDA graph (no host sync, fixed shapes). `tokens` is one buffer that the loop refills after each
    step returns: copy it to keep it. Selection follows HF generate: min_new_tokens blocks the
    eos tokens, then greedy argmax or sampling (temperature -> top-k -> top-p); a sequence that produced
    an eos emits pad_token_id (default: the first eos) from then on; generation stops once every sequence
    finished, and n_new is the number of steps HF would run (<= max_new_tokens). top_k 0 or None and
    top_p None or 1.0 switch those filters off. The host checks for the end every eos_check_every steps.

    graph_cache: keeps the loop's state and CUDA graph for later calls (see `DecodeGraphCache`); only
    for a step whose every input and output tensor keeps its address from call to call, including the
    tokens it is given (the loop's own buffer, kept with the graph). Without it each call captures anew.
    """
    _check_args(first_logits, max_new_tokens, min_new_tokens, do_sample, temperature, top_k, top_p,
                eos_token_id, pad_token_id, eos_check_every, generator)
    eos_token_ids = [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or None
    if pad_token_id is None and eos_token_ids is not None:
        pad_token_id = eos_token_ids[0]  # as HF does, with a warning there
    sampling = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    graphed = cuda_graph and first_logits.is_cuda
    batch, vocab = first_logits.shape
    token_capacity = max_new_tokens
    if graph_cache is not None:  # kept for later calls: room for nearby lengths too
        token_capacity = round_up(max_new_tokens, TOKEN_CAPACITY_MULTIPLE)
    # everything the captured work bakes in; a bound method step compares (and hashes) by its object
    key = (step, graphed, batch, vocab, first_logits.dtype, first_logits.device, token_capacity,
           None if eos_token_ids is None else tuple(eos_token_ids), pad_token_id, do_sample, temperature, top_k,
           top_p, generator)
    with torch.no_grad():
        loop = graph_cache.get(key) if graph_cache is not None else None
        if loop is None:
            loop = _Loop(_Iteration(first_logits, token_capacity, min_new_tokens, eos_token_ids, pad_token_id,
                                    sampling))
            if graph_cache is not None:
                graph_cache.put(key, loop)
        else:
            loop.iteration.reset(min_new_tokens)
        iteration = loop.iteration
        iteration(first_logits)

        def advance() -> None:
            iteration(step(iteration.last_token))

        steps = 1
        if graphed and loop.replay is None and max_new_tokens > 1 + WARMUP_STEPS:
            pool = None if graph_cache is None else graph_cache.memory_pool()
            graph, _ = warm_up_and_capture(advance, warmup_runs=WARMUP_STEPS, pool=pool, generator=generator)
            loop.replay = graph.replay
            steps += WARMUP_STEPS
        if graphed and loop.replay is not None:
            advance = loop.replay
        while steps < max_new_tokens:
            if eos_token_ids is not None and steps % eos_check_every == 0 and not iteration.unfinished.any():
                break
            advance()
            steps += 1
        return iteration.tokens[:, : int(iteration.steps_with_unfinished)].clone()  # the buffer is reused
