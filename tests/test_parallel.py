"""tritonize.parallel: 2 real processes over gloo (torchrun) against the single-process model, fp32.

The test saves tiny Llama (GQA) and GPT-2 models and left-padded prompts, launches tests/tp_worker.py
under `python -m torch.distributed.run --nproc-per-node 2`, and meanwhile computes the single-process
references. Each rank holds half the heads and half the MLP columns (checked), so its logits equal the
full model's only if the all-reduces sum both halves: a skipped all-reduce fails the logits checks.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from test_generation import TINY, left_padded, tiny

import tritonize
from tritonize import parallel
from tritonize.generation import DecoderEngine

WORKER = Path(__file__).with_name("tp_worker.py")
# GQA + rotary + SwiGLU; fused Conv1D qkv, learned positions, tied lm_head; an even vocabulary: the output
# projection split by vocabulary rows and the logits gathered (97 rows stay whole on every rank)
FAMILIES = ("llama", "gpt2", "llama-even-vocab")
EVEN_VOCAB = 96  # the prompts' ids stay below it, so every family's embedding holds them


def tiny_model(family: str) -> torch.nn.Module:
    if family != "llama-even-vocab":
        return tiny(family)
    config = transformers.LlamaConfig(**{**TINY, "vocab_size": EVEN_VOCAB})
    model = transformers.LlamaForCausalLM(config).eval()
    for param in model.parameters():
        if param.dim() == 2:
            param.data.normal_(0, 0.2)
    return model


def cpu_environment() -> dict:
    """The ranks run on the CPU over gloo, also on a machine with GPUs; they import what this process does."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "CUDA_VISIBLE_DEVICES": ""}


def single_process_reference(model, ids, mask) -> dict:
    engine = DecoderEngine(model)
    engine.reserve(ids.shape[0], ids.shape[1] + 1)
    with torch.no_grad():
        prefill_logits = engine.prefill(ids, mask.bool())
        step_logits = engine.step(prefill_logits.argmax(-1))
    hf_tokens = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, eos_token_id=None,
                               pad_token_id=0)
    return dict(prefill_logits=prefill_logits, step_logits=step_logits, hf_tokens=hf_tokens,
                tokens=tritonize.generate(model, ids, mask, max_new_tokens=4, eos_token_id=[]))


def test_two_processes_match_the_single_process_model(tmp_path):
    ids, mask = left_padded([6, 3], 6, vocab=EVEN_VOCAB)
    torch.save((ids, mask), tmp_path / "prompts.pt")
    models = {family: tiny_model(family) for family in FAMILIES}
    for family, model in models.items():
        torch.save(model, tmp_path / f"{family}.pt")
    (tmp_path / "families.txt").write_text(" ".join(FAMILIES))
    three_heads = transformers.LlamaConfig(hidden_size=48, num_hidden_layers=1, num_attention_heads=3,
                                           intermediate_size=64, vocab_size=97)
    torch.save(transformers.LlamaForCausalLM(three_heads).eval(), tmp_path / "three_heads.pt")
    env = cpu_environment()
    worker = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                               str(WORKER), str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        references = {family: single_process_reference(model, ids, mask) for family, model in models.items()}
        output = worker.communicate(timeout=180)[0].decode()
    finally:  # a failure here must not leave two ranks spinning on the CPU under the tests that follow
        if worker.poll() is None:  # SIGTERM: torchrun stops its ranks (they run in their own sessions)
            worker.terminate()
            worker.wait(timeout=60)
    assert worker.returncode == 0, output

    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    for results in ranks:
        assert results["world_size"] == 2
        for family in FAMILIES:
            seen, expected = results[family], references[family]
            assert seen["local_heads"] == 2  # of 4: each rank computes half of every attention block
            assert seen["vocab_parallel"] == (family == "llama-even-vocab")
            assert seen["all_reduce"] == "torch.distributed"  # gloo: symmetric memory is CUDA-only
            torch.testing.assert_close(seen["prefill_logits"], expected["prefill_logits"])
            torch.testing.assert_close(seen["step_logits"], expected["step_logits"])
            assert torch.equal(seen["tokens"], expected["hf_tokens"])
            assert torch.equal(seen["tokens"], expected["tokens"])
            assert seen["same_engine"]  # tritonize.generate used the tensor-parallel engine, not a new one
            assert seen["rebuilt_tp_size"] == 2 and torch.equal(seen["rebuilt_tokens"], expected["tokens"])
        assert "tp_size 2 must divide the heads (3)" in results["odd_heads_error"]
        assert "the ranks hold different models" in results["different_models_error"]
        assert results["released"]  # parallel.release dropped the engine before the group was destroyed
    assert torch.equal(ranks[0]["sampled"], ranks[1]["sampled"])  # rank 0's generator state was shared


def test_tensor_parallel_needs_a_process_group_and_a_supported_model(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(RuntimeError, match="init_from_torchrun.*torchrun --nproc-per-node"):
        parallel.tensor_parallel(tiny("llama"))
    bert = transformers.BertForMaskedLM(transformers.BertConfig(hidden_size=32, num_hidden_layers=1,
                                                                num_attention_heads=2, intermediate_size=64))
    with pytest.raises(ValueError, match="does not support model type 'bert'"):
        parallel.tensor_parallel(bert.eval())
    with pytest.raises(RuntimeError, match="no LOCAL_RANK.*torchrun"):
        parallel.init_from_torchrun()


def test_benchmark_script_runs_tiny_under_torchrun(tmp_path):
    script = Path(__file__).parents[1] / "benchmarks" / "tp_generate.py"
    env = cpu_environment()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", str(script), "--tiny",
                    "--batches", "2", "--repeats", "1", "--out", str(tmp_path)], env=env, check=True, timeout=120)
    result = json.loads((tmp_path / "tp-generate-tiny-world1-auto.json").read_text())
    assert result["world_size"] == 1 and result["backend"] == "gloo"
    assert [row["batch"] for row in result["rows"]] == [2] and result["rows"][0]["decode_tokens_per_s"] > 0
