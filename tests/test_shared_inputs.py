"""Layers called on the same input tensor share one input-factor product per batch
(``curvature.accumulate.shared_inputs``): the factors must equal those formed layer by layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import laplace_kron as lk
import laplace_kron.curvature.accumulate as acc

DT = torch.float64


class QKV(nn.Module):
    """Query / key / value projections of one input (joint bias), a bias-free projection of the
    same input (its ``A`` has no ones column: not shared with them), and a head on another."""

    def __init__(self, d: int = 5, h: int = 4):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, h), nn.Linear(d, h), nn.Linear(d, h)
        self.w = nn.Linear(d, h, bias=False)
        self.head = nn.Linear(h, 2)

    def forward(self, x):
        s = torch.tanh(self.q(x)) * self.k(x) + self.v(x).sin() + self.w(x)
        return self.head(s).mean(1)


def _recorded(monkeypatch) -> list[set]:
    """The groups (layer names) of each batch."""
    seen, real = [], acc.shared_inputs

    def shared_inputs(specs, orders):
        groups = real(specs, orders)
        seen.append({tuple(specs[i].name for i in g) for g in groups.values()})
        return groups

    monkeypatch.setattr(acc, "shared_inputs", shared_inputs)
    return seen


def _fit_both(monkeypatch, model, data, likelihood, **kw):
    seen = _recorded(monkeypatch)
    shared = lk.ekfac(model, data, likelihood, **kw)
    monkeypatch.setattr(acc, "shared_inputs", lambda *a: {})
    alone = lk.ekfac(model, data, likelihood, **kw)
    return shared, alone, seen


def _assert_same(c1, c2):
    d1, d2 = c1.to_dense(), c2.to_dense()
    assert torch.allclose(d1, d2, rtol=1e-12, atol=1e-12 * d2.abs().max())
    for b1, b2 in zip(c1.blocks, c2.blocks, strict=True):
        for name in ("A", "G", "E"):
            x, y = getattr(b1, name, None), getattr(b2, name, None)
            if isinstance(x, torch.Tensor):
                assert torch.allclose(x, y, rtol=1e-12, atol=1e-12 * y.abs().max()), name


@pytest.mark.parametrize("weight_sharing", ["expand", "reduce"])
def test_projections_of_one_input_share_their_input_factor(monkeypatch, weight_sharing):
    torch.manual_seed(0)
    model = QKV().to(DT)
    x = torch.randn(12, 3, 5, dtype=DT)
    data = [(x[:6], torch.randn(6, 2, dtype=DT)), (x[6:], torch.randn(6, 2, dtype=DT))]
    shared, alone, seen = _fit_both(
        monkeypatch, model, data, "regression", weight_sharing=weight_sharing
    )
    assert seen[0] == seen[-1] == {("q", "k", "v")}  # w: no ones column; head: another input
    _assert_same(shared, alone)


def test_llama_and_lora_share_input_factors(monkeypatch):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from test_hf_zoo_exact import _text

    torch.manual_seed(0)
    T = transformers
    base = _text(T.LlamaForCausalLM, T.LlamaConfig, num_key_value_heads=2)().to(DT).eval()
    ids = torch.randint(0, 23, (4, 5))
    data = [({"input_ids": ids[:2]}, ids[:2]), ({"input_ids": ids[2:]}, ids[2:])]
    kw = dict(shift_labels=True, embeddings="diag")
    shared, alone, seen = _fit_both(monkeypatch, base, data, "classification", **kw)
    groups = {tuple(n.rsplit(".", 1)[-1] for n in g) for g in seen[0]}
    assert groups == {("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")}
    _assert_same(shared, alone)

    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = peft.get_peft_model(base, lora).to(DT).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    monkeypatch.undo()
    shared, alone, seen = _fit_both(monkeypatch, model, data, "classification", **kw)
    groups = list(seen[0])
    assert len(groups) == 1 and all("lora_A" in n for n in groups[0]), groups
    _assert_same(shared, alone)
