"""Hugging Face models as users bring them (issue 15): tiny configs, no downloads, float64.

(a) a peft LoRA adapter on a tiny Llama causal LM (padded dict batches, ``shift_labels``),
(b) a tiny BERT sequence classifier with dict batches (its ``nn.Linear`` layers),
(c) a whole GPT-2 (``Conv1D``, LayerNorm, embeddings, the tied ``lm_head``): diagonal blocks
    where module hooks do not see the layer, padded = unpadded, the tied weight exact.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, jacrev

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import laplace_kron as lk  # noqa: E402

DT = torch.float64
VOCAB = 31


def _llama_lora():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        attn_implementation="eager",
    )
    base = transformers.LlamaForCausalLM(cfg).to(DT)
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = peft.get_peft_model(base, lora).to(DT).eval()
    with torch.no_grad():  # peft starts B at zero: give the adapter a non-trivial MAP
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    return model


LENGTHS = (4, 6, 3)


def _sequences():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(1, VOCAB, (n,), generator=g) for n in LENGTHS]


def _padded(seqs):
    T = max(map(len, seqs))
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _single(seqs):
    return [
        {"input_ids": s[None], "attention_mask": torch.ones(1, len(s), dtype=torch.long),
         "labels": s[None].clone()}
        for s in seqs
    ]  # fmt: skip


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
def test_llama_lora_padded_equals_unpadded_tune_predict(curvature):
    model = _llama_lora()
    seqs = _sequences()
    kw = dict(fisher="exact", shift_labels=True)
    la = lk.KronLaplace(model, "classification", curvature, **kw).fit([_padded(seqs)])
    assert all("lora_" in n for n in la.param_names) and la.num_data == 3
    one = lk.KronLaplace(model, "classification", curvature, **kw).fit(_single(seqs))
    torch.testing.assert_close(
        la.curvature.to_dense(), one.curvature.to_dense(), rtol=0, atol=1e-10
    )
    assert abs(la.curvature.loss - one.curvature.loss) < 1e-10
    torch.testing.assert_close(la.log_marginal_likelihood(), one.log_marginal_likelihood())
    la.optimize_prior_precision(method="marglik")
    assert torch.isfinite(la.log_marginal_likelihood())
    batch = _padded(seqs)
    p = la.predict(batch)  # token probabilities; the labels are dropped
    assert p.shape == (3, max(LENGTHS), VOCAB)
    torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:2], dtype=DT))


def test_llama_lora_one_token_every_block_is_the_exact_ggn_block():
    """One sequence whose shifted loss has one target (two tokens would share positions; with one
    token and no shift every layer sees one position): KFAC = exact GGN on each block."""
    model = _llama_lora()
    batch = {"input_ids": torch.tensor([[5]]), "labels": torch.tensor([[7]])}
    la = lk.KronLaplace(model, "classification", fisher="exact").fit([batch])
    curv = la.curvature
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = curv.param_names

    def logits(sel):
        out = functional_call(model, {**params, **sel}, (), {"input_ids": batch["input_ids"]})
        return out.logits.reshape(-1, VOCAB)

    jac = jacrev(logits)({n: params[n] for n in names})
    J = torch.cat([jac[n].reshape(1, VOCAB, -1) for n in names], 2)[0]
    with torch.no_grad():
        p = torch.softmax(logits({}), -1)[0]
    dense = J.T @ (torch.diag(p) - torch.outer(p, p)) @ J
    K = curv.to_dense()
    assert float(dense.norm()) > 1e-3  # the v_proj adapters' blocks are not trivial
    # LlamaRMSNorm computes in float32 whatever the model's dtype, so backward passes through it
    # round to float32 (both here and in jacrev): agreement to float32 round-off, not float64.
    for b in curv.blocks:
        idx = curv.block_index(b)
        blk = dense[idx][:, idx]
        # (q_proj's adapter has a zero block: one token attends only to itself)
        assert float((K[idx][:, idx] - blk).norm()) <= 1e-6 * float(dense.norm())


def _bert(vocab: int = VOCAB, positions: int = 16):
    """A tiny BERT sequence classifier (3 labels) and its nn.Linear layers' names."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=vocab,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=12,
        max_position_embeddings=positions,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    model = transformers.BertForSequenceClassification(cfg).to(DT).eval()
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return model, linear


def test_bert_classifier_dict_batches_fit_tune_predict():
    model, linear = _bert()
    seqs = _sequences()
    batch = _padded(seqs)
    batch["labels"] = torch.tensor([0, 2, 1])
    kw = dict(fisher="exact", modules=linear)
    la = lk.KronLaplace(model, "classification", **kw).fit([batch])
    single = [
        {"input_ids": s[None], "attention_mask": torch.ones(1, len(s), dtype=torch.long),
         "labels": batch["labels"][i : i + 1]}
        for i, s in enumerate(seqs)
    ]  # fmt: skip
    one = lk.KronLaplace(model, "classification", **kw).fit(single)
    torch.testing.assert_close(
        la.curvature.to_dense(), one.curvature.to_dense(), rtol=0, atol=1e-10
    )
    for curvature in ("ekfac",):
        e1 = lk.KronLaplace(model, "classification", curvature, **kw).fit([batch])
        e2 = lk.KronLaplace(model, "classification", curvature, **kw).fit(single)
        torch.testing.assert_close(
            e1.curvature.to_dense(), e2.curvature.to_dense(), rtol=0, atol=1e-10
        )
    la.optimize_prior_precision(method="marglik")
    p = la.predict(batch)
    assert p.shape == (3, 3)
    torch.testing.assert_close(p.sum(-1), torch.ones(3, dtype=DT))


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=8, n_layer=1, n_head=2, n_positions=16, attn_implementation="eager"
    )
    return transformers.GPT2LMHeadModel(cfg).to(DT).eval()


def test_gpt2_full_network_padded_equals_unpadded():
    """A whole GPT-2 (Conv1D projections, LayerNorm, token and position embeddings, the tied
    lm_head) is covered with ``modules=None``: the Conv1D weights, norms, embeddings and the tied
    wte / lm_head weight get diagonal blocks, one for all uses of the tied weight; padding changes
    nothing; the prior is tuned and token probabilities predicted."""
    model = _gpt2()
    n_params = sum(p.numel() for p in model.parameters())
    seqs = _sequences()
    batch = _padded(seqs)
    kw = dict(fisher="exact", shift_labels=True)
    la = lk.KronLaplace(model, "classification", **kw).fit([batch])
    assert la.n_params == n_params  # every trainable parameter, the tied one once
    single = [_padded([s]) for s in seqs]
    one = lk.KronLaplace(model, "classification", **kw).fit(single)
    for b1, b2 in zip(la.curvature.blocks, one.curvature.blocks, strict=True):
        torch.testing.assert_close(b1.eigvals(), b2.eigvals(), rtol=1e-9, atol=1e-12)
    ev1, ev2 = la.log_marginal_likelihood(), one.log_marginal_likelihood()
    assert abs(float(ev1) - float(ev2)) < 1e-9 * abs(float(ev2))
    la.optimize_prior_precision()
    p = la.predict({k: v for k, v in batch.items() if k != "labels"})
    assert p.shape == (3, max(LENGTHS), VOCAB)
    torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:2], dtype=DT))


def test_gpt2_tied_weight_diagonal_is_exact():
    """The tied wte / lm_head weight's diagonal block equals the exact GGN diagonal of the
    shifted token loss (torch.func over both uses), on one padded sequence pair."""
    model = _gpt2()
    batch = _padded(_sequences()[:2])
    la = lk.KronLaplace(model, "classification", fisher="exact", shift_labels=True).fit([batch])
    name = "transformer.wte.weight"
    (blk,) = [b for b in la.curvature.blocks if b.param_names == [name]]
    params = {n: p.detach() for n, p in model.named_parameters()}
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    exact = torch.zeros_like(params[name])
    for i in range(ids.shape[0]):

        def logits(w, i=i):
            out = functional_call(
                model,
                {**params, name: w},
                (),
                {"input_ids": ids[i : i + 1], "attention_mask": mask[i : i + 1]},
            )
            return out.logits[0, :-1]  # [T-1, V], paired with labels[1:]

        J = jacrev(logits)(params[name])  # [T-1, V, *w]
        p = torch.softmax(logits(params[name]), -1)
        for t in range(J.shape[0]):
            if labels[i, t + 1] == -100:
                continue
            H = torch.diag(p[t]) - torch.outer(p[t], p[t])
            Jt = J[t].reshape(VOCAB, -1)
            exact += torch.einsum("ci,cd,di->i", Jt, H, Jt).reshape(exact.shape)
    torch.testing.assert_close(blk.eigvals().reshape(exact.shape), exact, rtol=1e-8, atol=1e-12)


def _zoo(name: str):
    """Tiny configs of other popular Hugging Face architectures (no downloads)."""
    tr, V = transformers, VOCAB
    small = dict(num_hidden_layers=1, num_attention_heads=2, intermediate_size=12)
    return {
        "distilbert": lambda: tr.DistilBertForSequenceClassification(
            tr.DistilBertConfig(vocab_size=V, dim=8, n_layers=1, n_heads=2, hidden_dim=12)
        ),
        "roberta": lambda: tr.RobertaForSequenceClassification(
            tr.RobertaConfig(vocab_size=V, hidden_size=8, max_position_embeddings=20, **small)
        ),
        "electra": lambda: tr.ElectraForSequenceClassification(
            tr.ElectraConfig(vocab_size=V, embedding_size=4, hidden_size=8, **small)
        ),
        "mistral": lambda: tr.MistralForCausalLM(
            tr.MistralConfig(vocab_size=V, hidden_size=8, num_key_value_heads=1, **small)
        ),
        "opt": lambda: tr.OPTForCausalLM(
            tr.OPTConfig(
                vocab_size=V,
                hidden_size=8,
                num_hidden_layers=1,
                num_attention_heads=2,
                ffn_dim=12,
                word_embed_proj_dim=8,
                max_position_embeddings=20,
            )
        ),
        "gpt_neox": lambda: tr.GPTNeoXForCausalLM(
            tr.GPTNeoXConfig(vocab_size=V, hidden_size=8, **small)
        ),
        "vit": lambda: tr.ViTForImageClassification(
            tr.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=8, **small)
        ),
    }[name]


@pytest.mark.parametrize(
    "name", ["distilbert", "roberta", "electra", "mistral", "opt", "gpt_neox", "vit"]
)
def test_architecture_zoo_fit_tune_predict(name):
    """Other Hugging Face architectures as users bring them (dict batches, padding, causal-LM
    token loss, images): KFAC and EKFAC fit with Kronecker blocks, the evidence rises when the
    prior is tuned, the predictive is a distribution of the right shape."""
    torch.manual_seed(0)
    model = _zoo(name)().to(DT).eval()
    g = torch.Generator().manual_seed(1)
    if name == "vit":
        x = {"pixel_values": torch.randn(4, 1, 8, 8, generator=g, dtype=DT)}
        batch, kw, shape = {**x, "labels": torch.tensor([0, 1, 0, 1])}, {}, (2, 2)
    else:
        ids = torch.randint(1, VOCAB, (4, 6), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 4:] = 0
        x = {"input_ids": ids, "attention_mask": mask}
        if name in ("mistral", "opt", "gpt_neox"):  # causal LMs: the shifted token loss
            labels = ids.masked_fill(mask == 0, -100)
            batch, kw, shape = {**x, "labels": labels}, {"shift_labels": True}, (2, 6, VOCAB)
        else:
            batch, kw, shape = {**x, "labels": torch.tensor([0, 1, 0, 1])}, {}, (2, 2)
    for curvature in ("kfac", "ekfac"):
        la = lk.KronLaplace(model, "classification", curvature, **kw).fit([batch])
        assert any(type(b).__name__ != "DiagBlock" for b in la.curvature.blocks)
        before = float(la.log_marginal_likelihood())
        la.optimize_prior_precision()
        assert float(la.log_marginal_likelihood()) >= before
        probs = la.predict({k: v[:2] for k, v in x.items()})
        assert probs.shape == shape
        torch.testing.assert_close(probs.sum(-1), torch.ones(shape[:-1], dtype=DT))
