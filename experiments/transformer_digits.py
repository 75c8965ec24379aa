"""A small transformer on digits-as-token-sequences: MAP vs Laplace (all weights, last layer,
LoRA adapters only), in distribution, under rotation and out of distribution.

Each 8x8 digit is a sequence of 8 row tokens (8 features each). The model is a linear token
embedding, a free positional parameter, ``--layers`` ``nn.TransformerEncoderLayer`` blocks
(multi-head attention, LayerNorm, feed-forward; no dropout), a final LayerNorm, mean pooling and
a linear head: the layer mix people bring today (attention's functional projections, LayerNorm,
free parameters), which the library covers with Kronecker blocks for the linear layers its hooks
see and diagonal GGN blocks for every other trainable parameter.

Methods (GLM predictive, probit and centered-probit links; priors tuned by the evidence, one per
block for the all-weights posterior):

* ``MAP`` and ``Temp. scaling`` (temperature fitted on the validation split);
* ``KFAC Laplace`` over all weights (``modules=None``), ``LL-KFAC Laplace`` (last layer);
* ``LoRA Laplace``: the trained network frozen, rank-``--rank`` LoRA adapters (zero-initialised
  ``B A``) added to the token embedding and the head and fine-tuned for a few epochs, then a
  Laplace posterior over the adapters only (the parameters that require grad).

Shift: test digits rotated by ``--angles``; OOD: photo patches and uniform noise
(:func:`laplace_kron.datasets.ood_digits_like`). Outputs (``--out``): ``transformer_digits.md`` /
``.json`` and ``accuracy_vs_angle.png``, ``ece_vs_angle.png``.

    python experiments/transformer_digits.py            # full: 3 seeds
    python experiments/transformer_digits.py --quick    # smoke mode
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

try:
    from . import _common as C
except ImportError:  # run as a script
    import _common as C

from laplace_kron import KronLaplace, metrics, plots
from laplace_kron.datasets import (
    load_digits_split,
    make_loader,
    ood_digits_like,
    rotate_images,
    train_map,
)

STUDY = "transformer_digits"
ROWS = 8


class RowTransformer(nn.Module):
    """Digits as 8 row tokens -> transformer encoder -> mean pool -> linear head."""

    def __init__(self, width: int = 32, heads: int = 2, layers: int = 1, n_classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(ROWS, width)
        self.pos = nn.Parameter(0.02 * torch.randn(ROWS, width))
        block = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x.reshape(-1, ROWS, ROWS)) + self.pos
        return self.head(self.norm(self.blocks(h)).mean(1))


class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) B A x`` with ``base`` frozen and ``B`` initialised to zero."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float = 8.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Linear(base.in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False)
        nn.init.zeros_(self.lora_b.weight)
        self.scale = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scale * self.lora_b(self.lora_a(x))


def add_lora(model: RowTransformer, rank: int) -> RowTransformer:
    """Freeze ``model`` and wrap its token embedding and head with LoRA adapters (in place).

    The encoder layers' own linear maps are left alone: ``nn.TransformerEncoderLayer``'s fused
    inference path reads ``linear1.weight`` directly and would silently skip an adapter there."""
    model.requires_grad_(False)
    model.embed = LoRALinear(model.embed, rank)
    model.head = LoRALinear(model.head, rank)
    return model


def _probs(fn, x: Tensor, batch: int = 256) -> Tensor:
    return torch.cat([fn(x[i : i + batch]) for i in range(0, len(x), batch)])


def run_seed(seed: int, args) -> list[dict]:
    C.seed_everything(seed)
    data = load_digits_split(seed=seed, image=True)
    flat = {k: v.reshape(len(v), -1) for k, v in data.items() if k.startswith("x_")}
    loader = make_loader(flat["x_train"], data["y_train"], batch_size=64, seed=seed)
    model = RowTransformer(args.width, args.heads, args.layers)
    train_map(model, loader, epochs=args.epochs, lr=3e-3, weight_decay=args.weight_decay, seed=seed)
    model.eval()
    tests = {
        f"rot{a}": rotate_images(data["x_test"], a).reshape(len(data["x_test"]), -1)
        for a in args.angles
    }
    ood = ood_digits_like(args.n_ood, seed=seed, image=False)
    y = data["y_test"]

    with torch.no_grad():
        T = C.fit_temperature(model(flat["x_val"]), data["y_val"])
    predictors = {
        "MAP": lambda x: torch.softmax(model(x), -1),
        "Temp. scaling": lambda x: torch.softmax(model(x) / T, -1),
    }
    extra = {}
    for name, modules in (("KFAC Laplace", None), ("LL-KFAC Laplace", "last_layer")):
        with C.Timer() as t:
            la = KronLaplace(model, "classification", fisher="exact", modules=modules)
            la.fit(loader)
            la.optimize_prior_precision(granularity="layer")
        extra[name] = {"fit_s": t.seconds, "n_params": la.n_params, "n_blocks": la.n_blocks}
        for link in args.links:
            predictors[f"{name} ({link})"] = lambda x, la=la, link=link: la.predict(x, link=link)

    lora = add_lora(copy.deepcopy(model), args.rank)
    lora_params = [p for p in lora.parameters() if p.requires_grad]
    train_map(
        lora, loader, epochs=args.lora_epochs, lr=1e-3, weight_decay=args.weight_decay, seed=seed
    )
    with C.Timer() as t:
        la = KronLaplace(lora, "classification", fisher="exact")
        la.fit(loader)
        la.optimize_prior_precision(granularity="layer")
    extra["LoRA Laplace"] = {"fit_s": t.seconds, "n_params": la.n_params, "n_blocks": la.n_blocks}
    assert la.n_params == sum(p.numel() for p in lora_params)
    predictors["LoRA MAP"] = lambda x: torch.softmax(lora(x), -1)
    for link in args.links:
        predictors[f"LoRA Laplace ({link})"] = lambda x, la=la, link=link: la.predict(x, link=link)

    rows = []
    for name, fn in predictors.items():
        with torch.no_grad():
            p_in = _probs(fn, flat["x_test"])
            row = {"seed": seed, "method": name, **metrics.classification_report(p_in, y)}
            for key, x_shift in tests.items():
                p = _probs(fn, x_shift)
                row[f"acc_{key}"] = metrics.accuracy(p, y)
                row[f"ece_{key}"] = metrics.ece(p, y)
                row[f"nll_{key}"] = metrics.nll(p, y)
            for key, x_ood in ood.items():
                row[f"auroc_{key}"] = metrics.ood_auroc(p_in, _probs(fn, x_ood))
        base = name.split(" (")[0]
        row.update({k: v for k, v in extra.get(base, {}).items()})
        rows.append(row)
        C.log(
            f"seed {seed} {name}: acc {row['accuracy']:.3f} nll {row['nll']:.3f} "
            f"ece {row['ece']:.3f}"
        )
    return rows


def main(argv=None) -> None:
    p = C.make_parser(STUDY, __doc__.splitlines()[0], default_seeds=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--lora-epochs", type=int, default=5)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--angles", type=int, nargs="+", default=[0, 30, 60])
    p.add_argument("--links", nargs="+", default=["probit", "centered_probit"])
    p.add_argument("--n-ood", type=int, default=500)
    args = p.parse_args(argv)
    seeds = C.setup(args)
    if args.quick:
        args.epochs, args.lora_epochs, args.n_ood, args.angles = 3, 1, 100, [0, 60]
    rows = [r for s in seeds for r in run_seed(s, args)]
    angles = args.angles
    shift = [f"{m}_rot{a}" for a in angles for m in ("acc", "ece", "nll")]
    keys = ["accuracy", "nll", "ece", "brier", *shift, "auroc_patches", "auroc_noise", "fit_s"]
    table = C.aggregate(rows, ["method"], keys)
    cols = [
        ("method", "method"),
        ("accuracy", "Acc"),
        ("nll", "NLL"),
        ("ece", "ECE"),
        *[(f"acc_rot{a}", f"Acc@{a}°") for a in angles if a],
        *[(f"ece_rot{a}", f"ECE@{a}°") for a in angles if a],
        ("auroc_patches", "AUROC img"),
        ("auroc_noise", "AUROC noise"),
        ("fit_s", "fit s"),
    ]
    md, _ = C.write_results(
        args.out,
        STUDY,
        "Transformer on digits token sequences: MAP vs Laplace",
        [("Results (mean ± std over seeds)", C.markdown_table(table, cols))],
        {"rows": rows, "summary": table},
        vars(args),
    )
    for metric, label in (("acc", "accuracy"), ("ece", "ECE")):
        curves = {
            r["method"]: (
                [r[f"{metric}_rot{a}"]["mean"] for a in angles],
                [r[f"{metric}_rot{a}"]["std"] for a in angles],
            )
            for r in table
        }
        plots.metric_vs_shift(
            angles,
            curves,
            args.out / f"{label.lower()}_vs_angle.png",
            ylabel=label,
            xlabel="rotation (degrees)",
        )
    C.log(md.read_text())


if __name__ == "__main__":
    main()
