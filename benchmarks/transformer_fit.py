"""KFAC fit of a small GPT-2 vs one training epoch (issue 15 item 9), and the peers where they run.

    python benchmarks/transformer_fit.py [--quick] [--model llama]

A GPT-2 causal LM from a config (4 layers, width 256, 4 heads, 128 tokens, vocabulary 512, no
download), float32, 2 threads, a synthetic token data set (an order-2 Markov chain, so the logits
are not uniform). ``--model llama``: a Llama of the same size (separate query / key / value
projections and a gated MLP of width 688, RMSNorm, untied head), where the fit also runs with
its input factors formed layer by layer instead of once per shared input. Measured in one run,
every configuration once per repeat, in turn; the best of ``--repeats`` and the median of the
per-repeat ratios to the epoch:

* epoch: one forward + backward of the shifted token loss per batch over the data;
* laplace_kron KFAC fit (MC Fisher, 1 sample, ``shift_labels``): Kronecker blocks for every
  Conv1D (captured by parameter use), diagonal blocks for LayerNorms, the position embedding and
  the tied wte / lm_head weight; also with the Conv1D weights only (``modules`` = the blocks);
* curvlinops' KFACLinearOperator and laplace-torch (asdl and curvlinops backends) on the same
  model, where they run: what they say otherwise is printed.

The largest tensor created during the fit is recorded (a dispatch mode) and compared with
``B T P`` of the largest Kronecker block: no intermediate of that size is formed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import laplace_kron as lk


def build(quick: bool, kind: str = "gpt2"):
    import transformers

    torch.manual_seed(0)
    L, d, T, V = (2, 64, 32, 128) if quick else (4, 256, 128, 512)
    if kind == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=V,
            hidden_size=d,
            intermediate_size=d * 43 // 16,  # 688 at width 256: about Llama's 8/3 d
            num_hidden_layers=L,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=T,
            attn_implementation="eager",
        )
        model = transformers.LlamaForCausalLM(cfg).eval()
    else:
        cfg = transformers.GPT2Config(
            vocab_size=V, n_embd=d, n_layer=L, n_head=4, n_positions=T, attn_implementation="eager"
        )
        cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0
        model = transformers.GPT2LMHeadModel(cfg).eval()
    N, B = (16, 8) if quick else (64, 8)
    g = torch.Generator().manual_seed(1)
    trans = torch.randint(0, V, (V, 4), generator=g)  # each token has 4 likely successors
    ids = torch.empty(N, T, dtype=torch.long)
    ids[:, 0] = torch.randint(0, V, (N,), generator=g)
    for t in range(1, T):
        ids[:, t] = trans[ids[:, t - 1], torch.randint(0, 4, (N,), generator=g)]
    batches = [{"input_ids": ids[i : i + B], "labels": ids[i : i + B]} for i in range(0, N, B)]
    return model, batches, (L, d, T, V, N, B)


def interleaved(fns: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """``name -> (best seconds, median of the per-repeat ratios to the first entry)``: each
    repeat times every function once, in turn, so that a drift of the machine's load between
    repeats moves the numerator and the denominator of a ratio alike."""
    times: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    base = times[next(iter(fns))]
    return {
        n: (min(ts), statistics.median(t / b for t, b in zip(ts, base))) for n, ts in times.items()
    }


def epoch(model, batches):
    for b in batches:
        model.zero_grad(set_to_none=True)
        model(**b).loss.backward()


class Largest(TorchDispatchMode):
    """Records the largest tensor any operation returns."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.numel = max(self.numel, o.numel())
        return out


class Flat(nn.Module):
    """``input_ids -> [B T, V]`` logits of positions 0..T-2 (the peers' classification API)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        logits = self.model(input_ids=ids).logits[:, :-1]
        return logits.reshape(-1, logits.shape[-1])


def peers(model, batches) -> list[tuple[str, str]]:
    """(name, seconds or what went wrong) for curvlinops and laplace-torch."""
    flat = Flat(model).eval()
    data = [(b["input_ids"], b["input_ids"][:, 1:].reshape(-1)) for b in batches]
    params = [p for p in flat.parameters() if p.requires_grad]
    out = []

    def attempt(name, fn):
        try:
            t0 = time.perf_counter()
            fn()
            out.append((name, f"{time.perf_counter() - t0:.2f}"))
        except Exception as e:  # report what the peer says
            out.append((name, f"fails: {type(e).__name__}: {str(e).splitlines()[0][:150]}"))

    def curvlinops_kfac():
        from curvlinops import KFACLinearOperator

        loss = nn.CrossEntropyLoss(reduction="sum")
        op = KFACLinearOperator(
            flat, loss, params, data, fisher_type="mc", mc_samples=1, check_deterministic=False
        )
        op.compute_kronecker_factors() if hasattr(op, "compute_kronecker_factors") else None

    def laplace_torch(backend_name):
        def run():
            from laplace import Laplace
            from laplace.curvature import AsdlGGN, CurvlinopsGGN

            backend = {"asdl": AsdlGGN, "curvlinops": CurvlinopsGGN}[backend_name]
            la = Laplace(flat, "classification", "all", "kron", backend=backend)
            ids = torch.cat([b["input_ids"] for b in batches])
            loader = torch.utils.data.DataLoader(
                list(zip(ids, ids[:, 1:])),
                batch_size=batches[0]["input_ids"].shape[0],
                collate_fn=lambda rows: (
                    torch.stack([r[0] for r in rows]),
                    torch.stack([r[1] for r in rows]).reshape(-1),
                ),
            )
            la.fit(loader)

        return run

    attempt("curvlinops KFACLinearOperator (MC, 1 sample)", curvlinops_kfac)
    attempt("laplace-torch, asdl backend (kron)", laplace_torch("asdl"))
    attempt("laplace-torch, curvlinops backend (kron)", laplace_torch("curvlinops"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a smaller model (a smoke run)")
    ap.add_argument("--model", choices=["gpt2", "llama"], default="gpt2")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-peers", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, batches, (L, d, T, V, N, B) = build(args.quick, args.model)
    P = sum(p.numel() for p in model.parameters())
    title = {"gpt2": "GPT-2", "llama": "Llama"}[args.model]
    print(
        f"{title}: {L} layers, width {d}, {T} tokens, vocabulary {V}, {P} parameters; N={N}, B={B}"
    )
    kw = dict(fisher="mc", mc_samples=1, shift_labels=True)
    linear = [n for n, m in model.named_modules() if type(m).__name__ in ("Conv1D", "Linear")]
    fit = lambda **o: lk.kfac(model, batches, "classification", **kw, **o)  # noqa: E731
    # The diagonal blocks' sums by the separate per-example (vmapped) pass, as before they came
    # from the fit's own backward pass (curvature/diag_sums.py): the same numbers, slower.
    from laplace_kron.curvature import accumulate
    from laplace_kron.curvature.diag_sums import DiagonalSums

    def patched(owner, attr, value):
        def run():
            saved = getattr(owner, attr)
            setattr(owner, attr, value)
            try:
                fit()
            finally:
                setattr(owner, attr, saved)

        return run

    fns = {
        "epoch (forward + backward)": lambda: epoch(model, batches),
        "laplace_kron KFAC, whole network": fit,
    }
    if args.model == "gpt2":
        fns["laplace_kron KFAC, Conv1D blocks only"] = lambda: fit(modules=linear)
    else:
        name = "laplace_kron KFAC, whole network, input factors layer by layer (none shared)"
        fns[name] = patched(accumulate, "shared_inputs", lambda *a: {})
    fns["laplace_kron KFAC-reduce, whole network"] = lambda: fit(weight_sharing="reduce")
    name = "laplace_kron KFAC, whole network, diagonal blocks by the per-example pass"
    fns[name] = patched(DiagonalSums, "fast_names", lambda *a: [])
    fit()  # warm-up (first calls allocate)
    rows = interleaved(fns, args.repeats)
    curv = fit()
    kron = [b for b in curv.blocks if isinstance(b, lk.kron.KronBlock)]
    big = max(b.n_params for b in kron)
    with Largest() as largest:
        fit(modules=linear)
    e = rows["epoch (forward + backward)"][0]
    print("\n| what | best seconds | / best epoch | median ratio |\n|---|---|---|---|")
    for name, (t, ratio) in rows.items():
        print(f"| {name} | {t:.2f} | {t / e:.2f} | {ratio:.2f} |")
    if not args.no_peers:
        for name, t in peers(model, batches):
            ratio = f"{float(t) / e:.2f}" if t[0].isdigit() else ""
            print(f"| {name} | {t} | {ratio} | |")
    print(
        f"\n{len(kron)} Kronecker blocks, {len(curv.blocks) - len(kron)} diagonal; largest tensor "
        f"in the fit of the linear layers alone: {largest.numel:,} numbers; B T P of the largest "
        f"block: {B * T * big:,} ({'none formed' if largest.numel < B * T * big else 'FORMED'})"
    )


if __name__ == "__main__":
    main()
