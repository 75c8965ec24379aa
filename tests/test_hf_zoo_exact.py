"""More Hugging Face architectures, whole network, against the exact GGN: with one input of one
token (one patch for images) every Kronecker block equals the exact GGN block and every diagonal
block the exact GGN diagonal; the GLM covariance equals dense ``J Sigma J^T``; tuning raises the
evidence; the predictive is a distribution. Tiny configs, float64, no downloads."""

from __future__ import annotations

import types

import pytest
import torch

transformers = pytest.importorskip("transformers")

import laplace_kron as lk  # noqa: E402
from laplace_kron.kron import DiagBlock  # noqa: E402

DT = torch.float64
V = 23


def _text(cls, cfg_cls, **kw):
    base = dict(
        vocab_size=V,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=12,
        max_position_embeddings=16,
        num_labels=3,
        attn_implementation="eager",
    )
    return lambda: cls(cfg_cls(**{**base, **kw}))


T = transformers
NO_DROP = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
ZOO = {
    "qwen2": _text(T.Qwen2ForSequenceClassification, T.Qwen2Config, num_key_value_heads=2),
    "phi3": _text(
        T.Phi3ForSequenceClassification, T.Phi3Config, num_key_value_heads=2, pad_token_id=0
    ),
    "gemma": _text(
        T.GemmaForSequenceClassification, T.GemmaConfig, num_key_value_heads=2, head_dim=4
    ),
    "falcon": _text(T.FalconForSequenceClassification, T.FalconConfig),
    "deberta_v2": _text(T.DebertaV2ForSequenceClassification, T.DebertaV2Config, **NO_DROP),
    "mpnet": _text(T.MPNetForSequenceClassification, T.MPNetConfig, **NO_DROP),
    "albert": _text(
        T.AlbertForSequenceClassification,
        T.AlbertConfig,
        embedding_size=6,
        classifier_dropout_prob=0.0,
        **NO_DROP,
    ),
    "t5": lambda: T.T5ForSequenceClassification(
        T.T5Config(
            vocab_size=V,
            d_model=8,
            d_kv=4,
            d_ff=12,
            num_layers=1,
            num_heads=2,
            num_labels=3,
            dropout_rate=0.0,
            decoder_start_token_id=0,
        )
    ),  # fmt: skip
    "bart": lambda: T.BartForSequenceClassification(
        T.BartConfig(
            vocab_size=V,
            d_model=8,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=12,
            decoder_ffn_dim=12,
            max_position_embeddings=16,
            num_labels=3,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            eos_token_id=2,
        )
    ),  # fmt: skip
    "convnext": lambda: T.ConvNextForImageClassification(
        T.ConvNextConfig(
            num_channels=1,
            hidden_sizes=[8],
            depths=[1],
            num_stages=1,
            num_labels=3,
            image_size=4,
            patch_size=4,
        )
    ),  # fmt: skip
    "swin": lambda: T.SwinForImageClassification(
        T.SwinConfig(
            image_size=2,
            patch_size=2,
            num_channels=1,
            embed_dim=8,
            depths=[1],
            num_heads=[2],
            window_size=1,
            num_labels=3,
            drop_path_rate=0.0,
            **NO_DROP,
        )
    ),  # fmt: skip
}


def _one(name: str) -> dict:
    """One input of one position: a token (T5 / BART classify their end-of-sequence token, so
    it is that one), or an image of one patch."""
    if name in ("convnext", "swin"):
        s = 4 if name == "convnext" else 2
        g = torch.Generator().manual_seed(0)
        return {"pixel_values": torch.randn(1, 1, s, s, generator=g, dtype=DT)}
    return {"input_ids": torch.tensor([[{"t5": 1, "bart": 2}.get(name, 5)]])}


def _norm_float64(self, x):
    """RMS norms without their float32 cast (they compute in float32 whatever the model's dtype,
    which would limit a float64 check to float32 round-off); Gemma scales by ``1 + weight``."""
    eps = getattr(self, "variance_epsilon", getattr(self, "eps", None))
    w = 1 + self.weight if type(self).__name__ == "GemmaRMSNorm" else self.weight
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _jacobian(model, names, x) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[1, C]`` and their Jacobian ``[1, C, P]`` in the named parameters."""
    params = dict(model.named_parameters())
    wanted = [params[n] for n in names]
    f = model(**x).logits.reshape(1, -1)
    rows = []
    for r in f.flatten():
        g = torch.autograd.grad(r, wanted, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if gi is None else gi).flatten()
                               for p, gi in zip(wanted, g)]))  # fmt: skip
    return f.detach(), torch.stack(rows).unsqueeze(0)


@pytest.mark.parametrize("name", list(ZOO))
def test_one_token_blocks_are_the_exact_ggn(name):
    torch.manual_seed(0)
    model = ZOO[name]().to(DT).eval()
    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm") or type(m).__name__ == "T5LayerNorm":
            m.forward = types.MethodType(_norm_float64, m)
    x = _one(name)
    la = lk.KronLaplace(model, "classification", fisher="exact", prior_precision=1.0)
    la.fit([{**x, "labels": torch.tensor([1])}])
    curv = la.curvature
    assert any(not isinstance(b, DiagBlock) for b in curv.blocks)
    H = la.posterior_precision.to_dense() - torch.eye(la.n_params, dtype=DT)
    f, J = _jacobian(model, la.param_names, x)
    p = torch.softmax(f, -1)
    L = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    ggn = torch.einsum("mcp,mcd,mdq->pq", J, L, J)
    floor = 1e-6 * float(ggn.norm())  # blocks that are 0 (a key seeing one token) or tiny
    for b in curv.blocks:
        i = curv.block_index(b)
        got, want = (H[i, i], ggn[i, i]) if isinstance(b, DiagBlock) else (H[i][:, i], ggn[i][:, i])
        err = float((got - want).norm()) / max(float(want.norm()), floor)
        assert err < 1e-8, (b.param_names, err)
    cov = la.functional_covariance(x)
    ref = J @ la.posterior_covariance.to_dense() @ J.mT
    torch.testing.assert_close(cov, ref, rtol=1e-10, atol=1e-14)
    before = float(la.log_marginal_likelihood())
    la.optimize_prior_precision()
    assert float(la.log_marginal_likelihood()) >= before
    probs = la.predict(x)
    assert probs.shape == (1, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, dtype=DT))


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
def test_token_classifier_padded_equals_unpadded(curvature):
    """A token classifier (logits ``[B, T, C]``, labels ``[B, T]`` with ``-100`` at padding):
    a padded batch gives the curvature and evidence of its sequences fitted one by one."""
    torch.manual_seed(0)
    model = _text(T.BertForTokenClassification, T.BertConfig, num_labels=4, **NO_DROP)()
    model = model.to(DT).eval()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, V, (n,), generator=g) for n in (5, 3, 4)]
    labels = [torch.randint(0, 4, (n,), generator=g) for n in (5, 3, 4)]
    ids = torch.zeros(3, 5, dtype=torch.long)
    mask, lab = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, (s, y) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)], mask[i, : len(s)], lab[i, : len(s)] = s, 1, y
    padded = [{"input_ids": ids, "attention_mask": mask, "labels": lab}]
    single = [
        {"input_ids": s[None], "attention_mask": torch.ones_like(s)[None], "labels": y[None]}
        for s, y in zip(seqs, labels)
    ]
    kw = dict(fisher="exact")
    a = lk.KronLaplace(model, "classification", curvature, **kw).fit(padded)
    b = lk.KronLaplace(model, "classification", curvature, **kw).fit(single)
    assert any(isinstance(blk, DiagBlock) for blk in a.curvature.blocks)
    torch.testing.assert_close(
        a.curvature.to_dense(), b.curvature.to_dense(), rtol=1e-10, atol=1e-12
    )
    torch.testing.assert_close(a.log_marginal_likelihood(), b.log_marginal_likelihood())
    p = a.predict({"input_ids": ids, "attention_mask": mask})
    assert p.shape == (3, 5, 4)
    torch.testing.assert_close(p.sum(-1), torch.ones(3, 5, dtype=DT))
