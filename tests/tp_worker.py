"""One rank of tests/test_parallel.py: `torchrun --nproc-per-node 2 tests/tp_worker.py DIR`.

Reads the models and prompts that the test saved in DIR, runs them tensor parallel over gloo, and writes
what it saw to DIR/rank{RANK}.pt for the test to compare with the single-process model.
"""

import os
import sys
from pathlib import Path

import torch

import tritonize
from tritonize import parallel
from tritonize.generation.api import ENGINE_ATTRIBUTE


def error_of(call) -> str:
    try:
        call()
    except (ValueError, RuntimeError) as error:
        return str(error)
    return "no error"


def main(folder: Path) -> None:
    rank, world_size = parallel.init_from_torchrun()
    ids, mask = torch.load(folder / "prompts.pt")
    results = {"world_size": world_size}
    for family in (folder / "families.txt").read_text().split():
        model = torch.load(folder / f"{family}.pt", weights_only=False)
        assert parallel.tensor_parallel(model) is model
        engine = getattr(model, ENGINE_ATTRIBUTE)
        engine.reserve(ids.shape[0], ids.shape[1] + 1)
        with torch.no_grad():
            prefill_logits = engine.prefill(ids, mask.bool())
            step_logits = engine.step(prefill_logits.argmax(-1))
        tokens = tritonize.generate(model, ids, mask, max_new_tokens=4, eos_token_id=[])
        same_engine = getattr(model, ENGINE_ATTRIBUTE) is engine
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # rebuilds the engine
        rebuilt_tokens = tritonize.generate(model, ids, mask, max_new_tokens=4, eos_token_id=[])
        results[family] = dict(local_heads=engine.local_heads, vocab_parallel=engine.vocab_parallel,
                               all_reduce=engine.collectives.method, prefill_logits=prefill_logits,
                               step_logits=step_logits, tokens=tokens, same_engine=same_engine,
                               rebuilt_tokens=rebuilt_tokens, rebuilt_tp_size=getattr(model, ENGINE_ATTRIBUTE).tp_size)
    generator = torch.Generator().manual_seed(rank)  # different seeds: the ranks must still agree
    results["sampled"] = tritonize.generate(model, ids, mask, max_new_tokens=4, eos_token_id=[], do_sample=True,
                                            generator=generator)
    odd_heads = torch.load(folder / "three_heads.pt", weights_only=False)
    results["odd_heads_error"] = error_of(lambda: parallel.tensor_parallel(odd_heads))
    other = torch.load(folder / "llama.pt", weights_only=False)
    other.lm_head.weight.data[0, 0] += rank
    results["different_models_error"] = error_of(lambda: parallel.tensor_parallel(other))
    parallel.release(model)
    results["released"] = not hasattr(model, ENGINE_ATTRIBUTE)
    torch.save(results, folder / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    sys.stdout.flush()
    # results saved and the group destroyed: skip the interpreter's teardown, where gloo's threads were
    # seen to abort under load ("terminate called without an active exception", 1 run in 4)
    os._exit(0)
