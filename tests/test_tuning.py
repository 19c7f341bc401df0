"""The tuning cache: JSON round trip, layering over the shipped table, bad files, and ops.linear using it."""

import dataclasses
import json
import logging

import pytest
import torch
import triton.testing
from helpers import assert_close

import tritonize.ops
from tritonize import tuning
from tritonize.kernels import reference
from tritonize.kernels.linear import LinearConfig

CONFIG = {"block_m": 16, "block_n": 32, "block_k": 32, "group_m": 1, "num_warps": 4, "num_stages": 2,
          "split_k": 2, "persistent": False}


def write(path, entries, version=tuning.FORMAT_VERSION):
    path.write_text(json.dumps({"version": version, "entries": entries}))


def test_round_trip_in_a_new_cache_object(tmp_path):
    path = tmp_path / "sub" / "tuning.json"
    tuning.TuningCache(path, shipped=tmp_path / "none.json").put("linear", "card A", "M16 key", CONFIG)
    again = tuning.TuningCache(path, shipped=tmp_path / "none.json")  # what a new process reads
    assert again.get("linear", "card A", "M16 key") == CONFIG
    assert again.get("linear", "card B", "M16 key") is None  # never crosses cards
    assert json.loads(path.read_text())["version"] == tuning.FORMAT_VERSION


def test_user_entries_override_the_shipped_table(tmp_path):
    shipped, user = tmp_path / "shipped.json", tmp_path / "user.json"
    write(shipped, {"linear": {"card": {"k1": {"from": "shipped"}, "k2": {"from": "shipped"}}}})
    write(user, {"linear": {"card": {"k1": {"from": "user"}}}})
    found = tuning.TuningCache(user, shipped=shipped)
    assert found.get("linear", "card", "k1") == {"from": "user"}
    assert found.get("linear", "card", "k2") == {"from": "shipped"}


@pytest.mark.parametrize("content", ["{not json", json.dumps({"version": 99, "entries": {}}), "[]"])
def test_unreadable_or_foreign_files_are_ignored_with_a_warning(tmp_path, caplog, content):
    path = tmp_path / "tuning.json"
    path.write_text(content)
    with caplog.at_level(logging.WARNING, logger="tritonize"):
        found = tuning.TuningCache(path, shipped=tmp_path / "none.json")
    assert found.get("linear", "card", "key") is None
    assert "ignoring" in caplog.text and str(path) in caplog.text


def test_environment_variable_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv(tuning.ENV_PATH, str(tmp_path / "mine.json"))
    assert tuning.user_path() == tmp_path / "mine.json"
    assert tuning.cache().path == tmp_path / "mine.json"


def test_shipped_table_holds_valid_linear_configs():
    entries = json.loads(tuning.SHIPPED.read_text())["entries"]
    for per_card in entries.get("linear", {}).values():
        for config in per_card.values():
            if config != {"backend": tritonize.ops.CUBLAS}:
                LinearConfig(**config)


def test_shipped_h100_bert_base_table_adds_no_tiled_variant_at_the_largest_shape_class():
    """A new bucket's warm-up is mostly the Triton variants it compiles first. On the H100, bert-base's 32 x 512
    bucket (M class 16384) reuses the tiled configs of its 8 x 512 one (M class 4096), each measured within 1 %
    of that shape's fastest (docs/kernels.md), so it compiles no new linear variant. Re-tuning the table must
    keep this or say in docs/kernels.md why a new variant is worth its compile."""
    per_card = json.loads(tuning.SHIPPED.read_text())["entries"]["linear"]["NVIDIA H100 80GB HBM3"]

    def tiled(m_class):
        return {(key.split(" ", 4)[4], json.dumps(config, sort_keys=True)) for key, config in per_card.items()
                if key.startswith(f"M{m_class} ") and " float16 " in key and "backend" not in config}

    largest = tiled(16384)  # (activation, bias and residual flags; config): what a Triton variant compiles for
    assert largest, "the H100 table lost its bert-base entries at M16384"
    assert largest <= tiled(4096), f"new variants at M16384: {largest - tiled(4096)}"


def test_entries_lists_one_cards_configs_the_users_over_the_shipped(tmp_path):
    shipped, user = tmp_path / "shipped.json", tmp_path / "user.json"
    write(shipped, {"linear": {"card": {"k1": {"from": "shipped"}, "k2": {"from": "shipped"}}, "other": {"k3": {}}}})
    write(user, {"linear": {"card": {"k1": {"from": "user"}}}})
    found = tuning.TuningCache(user, shipped=shipped)
    assert found.entries("linear", "card") == {"k1": {"from": "user"}, "k2": {"from": "shipped"}}
    assert found.entries("linear", "no such card") == {}


FAST, NEAR, FAR = (LinearConfig(128, 256, 64, num_warps=8), LinearConfig(128, 128, 64, num_warps=8),
                   LinearConfig(64, 64, 64))


@pytest.mark.parametrize(("in_use", "chosen"), [
    (set(), FAST),  # nothing compiled yet: the fastest
    ({NEAR}, NEAR),  # 1.5 % slower but already compiled for another shape: kept
    ({FAR}, FAST),  # 3 % slower: a new variant is worth its compile
    ({NEAR, FAR}, NEAR),
    ({FAST, NEAR}, FAST),  # the fastest is in use too
])
def test_tuning_prefers_a_variant_in_use_within_the_tolerance(in_use, chosen):
    timed = [(FAR, 1.03), (FAST, 1.0), (NEAR, 1.015)]
    assert tritonize.ops.SHARED_VARIANT_TOLERANCE == 0.02
    assert tritonize.ops.prefer_variants_in_use(timed, in_use) == (chosen, dict(timed)[chosen])


def test_variants_in_use_are_the_tiled_configs_of_the_same_epilogue(tmp_path, monkeypatch):
    monkeypatch.setenv(tuning.ENV_PATH, str(tmp_path / "tuning.json"))
    for key, config in [("M4096 N768 K768 float16 none bias=True residual=True", FAST),
                        ("M16 N768 K3072 float16 none bias=True residual=True", NEAR),
                        ("M4096 N3072 K768 float16 gelu bias=True residual=False", FAR),  # another epilogue
                        ("M4096 N768 K768 bfloat16 none bias=True residual=True", FAR),  # another dtype
                        ("M512 N768 K768 float16 none bias=True residual=True", {"backend": tritonize.ops.CUBLAS})]:
        tuning.cache().put("linear", "card", key, config if isinstance(config, dict) else dataclasses.asdict(config))
    tuning.cache().put("linear", "another card", "M16 N8 K8 float16 none bias=True residual=True",
                       dataclasses.asdict(FAR))
    in_use = tritonize.ops._tiled_configs_in_use("card", "float16 none bias=True residual=True")
    assert in_use == {FAST, NEAR}


def test_autotuning_flag_is_scoped():
    assert not tuning.is_autotuning()
    with tuning.autotuning():
        assert tuning.is_autotuning()
    assert not tuning.is_autotuning()


def test_ops_linear_runs_the_cached_config(tmp_path, monkeypatch, device):
    """A cache entry for this card and shape class steers the launch (and the result stays right)."""
    monkeypatch.setenv(tuning.ENV_PATH, str(tmp_path / "tuning.json"))
    card = torch.cuda.get_device_name() if device == "cuda" else "triton-interpreter"
    x, weight = torch.randn(5, 40, device=device), torch.randn(24, 40, device=device)
    key = "M16 N24 K40 float32 gelu bias=False residual=False"
    tuning.cache().put("linear", card, key, CONFIG)
    seen = []
    real = tritonize.ops.linear_fwd

    def spy(*args, config=None):
        seen.append(config)
        return real(*args, config=config)

    monkeypatch.setattr(tritonize.ops, "linear_fwd", spy)
    out = tritonize.ops.linear(x, weight, activation="gelu")
    assert seen == [LinearConfig(**CONFIG)]
    assert_close(out, reference.linear(x.double(), weight.double(), None, "gelu", None), torch.float32)


@pytest.mark.parametrize("activation, bias, residual",
                         [("gelu", True, True), (None, False, True), (None, True, False), (None, False, False)])
def test_ops_linear_takes_the_cublas_route_when_the_cache_says_so(activation, bias, residual, tmp_path, monkeypatch,
                                                                  device):
    """An entry {"backend": "cublas"}: torch's matmul, then the epilogue kernel unless addmm holds it all."""
    monkeypatch.setenv(tuning.ENV_PATH, str(tmp_path / "tuning.json"))
    card = torch.cuda.get_device_name() if device == "cuda" else "triton-interpreter"
    x, weight = torch.randn(2, 5, 40, device=device), torch.randn(24, 40, device=device)
    b = torch.randn(24, device=device) if bias else None
    r = torch.randn(2, 5, 24, device=device) if residual else None
    key = f"M16 N24 K40 float32 {activation or 'none'} bias={bias} residual={residual}"
    tuning.cache().put("linear", card, key, {"backend": tritonize.ops.CUBLAS})
    epilogues = []
    real_epilogue = tritonize.ops.linear_epilogue_fwd
    monkeypatch.setattr(tritonize.ops, "linear_fwd", lambda *args, **kwargs: pytest.fail("tiled kernel ran"))
    monkeypatch.setattr(tritonize.ops, "linear_epilogue_fwd",
                        lambda *args, **kwargs: epilogues.append(1) or real_epilogue(*args, **kwargs))
    out = tritonize.ops.linear(x, weight, b, activation=activation, residual=r)
    assert len(epilogues) == (activation is not None or residual)
    expected = reference.linear(x.double(), weight.double(), None if b is None else b.double(), activation,
                                None if r is None else r.double())
    assert_close(out, expected, torch.float32)


@pytest.mark.gpu
def test_autotuning_times_candidates_once_and_stores_the_fastest(tmp_path, monkeypatch):
    monkeypatch.setenv(tuning.ENV_PATH, str(tmp_path / "tuning.json"))
    x = torch.randn(200, 256, device="cuda", dtype=torch.float16)
    weight = torch.randn(384, 256, device="cuda", dtype=torch.float16)
    with tuning.autotuning():
        out = tritonize.ops.linear(x, weight, activation="relu")
    stored = json.loads((tmp_path / "tuning.json").read_text())["entries"]["linear"][torch.cuda.get_device_name()]
    assert list(stored) == ["M256 N384 K256 float16 relu bias=False residual=False"]
    entry = stored["M256 N384 K256 float16 relu bias=False residual=False"]
    assert entry == {"backend": tritonize.ops.CUBLAS} or LinearConfig(**entry)
    assert_close(out, reference.linear(x.double(), weight.double(), None, "relu", None), torch.float16)


@pytest.mark.gpu
def test_autotuning_times_the_configs_in_use_and_keeps_one_within_the_tolerance(tmp_path, monkeypatch):
    """A config stored for another shape with the same epilogue is timed with the candidates and kept when
    within SHARED_VARIANT_TOLERANCE of the fastest (timings faked: the choice, not the clock, is under test)."""
    monkeypatch.setenv(tuning.ENV_PATH, str(tmp_path / "tuning.json"))
    card = torch.cuda.get_device_name()
    in_use = LinearConfig(32, 64, 32, num_warps=2, num_stages=2)  # no candidate of the sweep
    tuning.cache().put("linear", card, "M64 N96 K32 float16 relu bias=False residual=False", dataclasses.asdict(in_use))
    timed_candidates = []

    def fake_timing(x, weight, bias, activation, residual, candidates):
        timed_candidates.extend(candidates)
        return [(config, 1.015 if config == in_use else 1.0) for config in candidates]

    monkeypatch.setattr(tritonize.ops, "time_linear_configs", fake_timing)
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", lambda *args, **kwargs: 2.0)  # cuBLAS: slower
    x = torch.randn(200, 256, device="cuda", dtype=torch.float16)
    weight = torch.randn(384, 256, device="cuda", dtype=torch.float16)
    with tuning.autotuning():
        out = tritonize.ops.linear(x, weight, activation="relu")
    assert in_use in timed_candidates and len(timed_candidates) > 1
    stored = tuning.cache().get("linear", card, "M256 N384 K256 float16 relu bias=False residual=False")
    assert stored == dataclasses.asdict(in_use)
    assert_close(out, reference.linear(x.double(), weight.double(), None, "relu", None), torch.float16)
