"""Sibling linears: weights packed back to back without changing the model, then merged into one linear."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from test_passes import _compile, _ops_calls
from torch import nn

from tritonize.passes import pack_sibling_linears
from tritonize.reporting import Report
from tritonize.runtime import tritonize_backend


class Projections(nn.Module):
    """Attention-style q, k, v projections of one input (odd widths), plus a gated pair with SiLU."""

    def __init__(self, hidden=24, widths=(16, 8, 8)):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(hidden, w) for w in widths)
        self.gate, self.up = nn.Linear(hidden, 40, bias=False), nn.Linear(hidden, 40, bias=False)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        return torch.cat([q * 2, k - v], dim=-1), F.silu(self.gate(x)) * self.up(x)


def test_packing_moves_storage_only(device):
    model = Projections().to(device)
    before = {name: (id(p), p.detach().clone()) for name, p in model.named_parameters()}
    assert pack_sibling_linears(model) == 2  # (q, k, v weights + biases) and (gate, up)
    for name, p in model.named_parameters():
        assert id(p) == before[name][0] and torch.equal(p, before[name][1]), name
    q, k, v = model.q.weight, model.k.weight, model.v.weight
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    assert k.storage_offset() == q.numel() and v.storage_offset() == q.numel() + k.numel()


def test_tied_weights_stay_where_they_are(device):
    model = Projections().to(device)
    model.k.weight = model.q.weight = nn.Parameter(torch.randn(16, 24, device=device))
    model.k.bias = nn.Parameter(torch.randn(16, device=device))
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    pack_sibling_linears(model)
    assert model.q.weight.data_ptr() == pointers["q.weight"]


@pytest.mark.parametrize("packed", [True, False])
def test_merged_only_when_back_to_back_and_nothing_to_fuse(packed, device):
    model = Projections().to(device).eval()
    if packed:
        pack_sibling_linears(model)
    x = torch.randn(3, 5, 24, device=device)
    out, expected, report, graphs = _compile(model, x)
    for got, want in zip(out, expected, strict=True):
        assert_close(got, want, torch.float32)
    calls = [name for name, _ in _ops_calls(graphs)]
    # packed: q, k, v as one linear; gate (SiLU to fuse) and up keep their own linears either way
    assert report.replaced["linear_merge"] == (1 if packed else 0)
    assert calls.count("linear") == (3 if packed else 5), calls


@pytest.mark.parametrize("replace", ["parameter", "data"])
def test_a_weight_replaced_after_merging_is_seen(replace, device):
    """Without CUDA graphs the compiled graph runs on every call: after one packed weight is replaced (so
    no longer next to the others), TorchDynamo's guards retrace, and the result follows the new weight. A
    replaced `.data` only from torch 2.13: torch 2.11's guards miss it (the documented caveat)."""
    if replace == "data" and tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 13):
        pytest.skip("TorchDynamo before 2.13 does not guard on a parameter's replaced .data (seen on 2.11)")
    model = Projections().to(device).eval()
    pack_sibling_linears(model)
    report = Report()
    compiled = torch.compile(model, backend=tritonize_backend(report))
    x = torch.randn(3, 5, 24, device=device)
    with torch.inference_mode():
        compiled(x)
        if replace == "parameter":
            model.k.weight = nn.Parameter(torch.randn_like(model.k.weight))
        else:
            model.k.weight.data = torch.randn_like(model.k.weight)
        got, want = compiled(x), model(x)
    assert_close(got[0], want[0], torch.float32)
    assert report.compiles == 2
