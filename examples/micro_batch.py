#!/usr/bin/env python3
"""Micro-batch training on real data: exact BatchNorm, GroupNorm and the fxbns ``micro`` preset, each at its own
learning rate.

A small ResNet on scikit-learn's bundled digits (16x16) at batch 1, 2 and 4, and 32 for reference.  GroupNorm (8
groups) is swapped in by this script as the usual alternative at small batches.  For each normalisation and batch
the learning rate comes from a sweep on a validation split carved out of the training images (seed 0): the rate
with the best validation accuracy is kept, and the test set is not looked at.  Then 3 seeds train at that rate
(seed 0's sweep run is one of them) and are evaluated on the test set.  Every method trains on the same images
for the same number of epochs (SGD with Nesterov momentum, one-cycle schedule, random shifts).  Writes
examples/results/micro_batch.{json,png}.

    python examples/micro_batch.py            # batch 1, 2, 4, 32; 6 rates; 3 seeds (about 20 minutes on 2 idle cores)
    python examples/micro_batch.py --quick    # batch 2 and 32, 2 rates, 1 seed, fewer images: checks that it runs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import OUT, SmallResNet, save_record, train  # noqa: E402

import fxbns  # noqa: E402
from fxbns import Policy  # noqa: E402
from fxbns.datasets import digits  # noqa: E402

KINDS = ["batchnorm", "groupnorm", "micro"]
LABELS = {"batchnorm": "BatchNorm", "groupnorm": "GroupNorm", "micro": "fxbns micro"}


def build(kind: str, x):
    if kind == "groupnorm":
        return SmallResNet(norm="gn")
    model = SmallResNet(norm="bn")
    # every layer sampled at batch 32 too (min_elements=0); at batch <= 4 the micro estimator applies
    policy = "exact" if kind == "batchnorm" else Policy.from_preset("micro").set_min_elements(0)
    return fxbns.transform(model, policy, example_inputs=x[:2])


def run(kind, data, b, lr, seed, epochs):
    torch.manual_seed(seed)
    model = build(kind, data[0])
    acc, _, _ = train(model, data, epochs=epochs, batch=b, lr=lr, seed=seed)
    return acc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,2,4,32")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rates", default="0.003,0.01,0.03,0.1,0.3,1.0",
                    help="learning rates to sweep, at batch 32 (scaled linearly with the batch)")
    ap.add_argument("--val", type=int, default=300, help="training images held out for the sweep")
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.batches, args.rates, args.seeds, args.epochs = "2,32", "0.1,0.3", 1, 1
    torch.set_num_threads(2)
    xtr, ytr, xte, yte = digits(size=args.size, seed=0)
    if args.quick:
        xtr, ytr, xte, yte = xtr[:500], ytr[:500], xte[:200], yte[:200]
        args.val = 100
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(len(ytr), generator=g)
    va, tr = perm[:args.val], perm[args.val:]
    sweep_data = (xtr[tr], ytr[tr], xtr[va], ytr[va])  # validation: never the test set
    test_data = (xtr[tr], ytr[tr], xte, yte)
    rates = [float(v) for v in args.rates.split(",")]
    results: dict = {}
    t0 = time.time()
    for b in (int(v) for v in args.batches.split(",")):
        for kind in KINDS:
            sweep = []
            for r32 in rates:
                lr = r32 * b / 32
                acc = run(kind, sweep_data, b, lr, 0, args.epochs)
                sweep.append({"lr_at_32": r32, "lr": lr, "val_acc": acc})
                print(f"batch {b:2d} {kind:10s} lr {lr:.4g}: validation {100 * acc:.2f}%  ({time.time() - t0:.0f} s)",
                      flush=True)
            best = max(sweep, key=lambda s: s["val_acc"])  # the first (smallest) rate among equals
            accs = [run(kind, test_data, b, best["lr"], seed, args.epochs) for seed in range(args.seeds)]
            results.setdefault(str(b), {})[kind] = {
                "sweep": sweep, "lr": best["lr"], "lr_at_32": best["lr_at_32"], "test_acc": accs,
                "mean": statistics.mean(accs), "min": min(accs), "max": max(accs),
                "rate_at_edge": best["lr_at_32"] in (rates[0], rates[-1]) and len(rates) > 1}
            r = results[str(b)][kind]
            print(f"batch {b:2d} {kind:10s} at lr {best['lr']:.4g}: test {100 * r['mean']:.2f}% "
                  f"[{100 * r['min']:.2f}-{100 * r['max']:.2f}] over {args.seeds} seeds  ({time.time() - t0:.0f} s)",
                  flush=True)
    print(f"\ntest accuracy, mean [min-max] of {args.seeds} seeds, each at its best validation rate (at batch 32):")
    print("| batch | " + " | ".join(LABELS[k] for k in KINDS) + " |")
    print("|---|" + "---|" * len(KINDS))
    for b, res in results.items():
        print(f"| {b} | " + " | ".join(f"{100 * res[k]['mean']:.2f} [{100 * res[k]['min']:.2f}-{100 * res[k]['max']:.2f}]"
                                       f" ({res[k]['lr_at_32']:g})" for k in KINDS) + " |")
    edges = [(b, k) for b, res in results.items() for k, r in res.items() if r["rate_at_edge"]]
    if edges:
        print("best rate at the edge of the sweep (widen --rates): " + ", ".join(f"batch {b} {k}" for b, k in edges))
    comparisons = {}
    for b, res in results.items():
        for other in ("batchnorm", "groupnorm"):
            m, o = res["micro"], res[other]
            comparisons[f"micro - {other} at batch {b}"] = {
                "difference": m["mean"] - o["mean"], "ranges_overlap": m["min"] <= o["max"] and o["min"] <= m["max"]}
    for c, v in comparisons.items():
        print(f"{c}: {100 * v['difference']:+.2f} points ({'ranges overlap' if v['ranges_overlap'] else 'apart'})")
    rec = save_record("micro_batch", {
        "command": "python examples/micro_batch.py " + " ".join(sys.argv[1:]),
        "data": f"sklearn digits {args.size}x{args.size}: {len(tr)} training, {len(va)} validation (sweep), "
                f"{len(yte)} test images",
        "epochs": args.epochs, "seeds": args.seeds, "rates_at_32": rates, "results": results,
        "comparisons": comparisons, "rate_at_edge": [f"batch {b} {k}" for b, k in edges],
        "seconds": round(time.time() - t0, 1)})
    _plot(results)
    print(f"record: {rec}\nplot: {OUT / 'micro_batch.png'}")
    return 0


def _plot(results) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    bs = list(results)
    for i, k in enumerate(KINDS):
        xs = [j + (i - 1) * 0.08 for j in range(len(bs))]
        mean = [100 * results[b][k]["mean"] for b in bs]
        err = [[m - 100 * results[b][k]["min"] for m, b in zip(mean, bs)],
               [100 * results[b][k]["max"] - m for m, b in zip(mean, bs)]]
        ax.errorbar(xs, mean, yerr=err, marker="o", capsize=3, label=LABELS[k])
    ax.set_xticks(range(len(bs)), bs)
    ax.set_xlabel("batch size")
    ax.set_ylabel("test accuracy (%), mean and range of seeds")
    ax.set_title("small ResNet on digits, each at its best learning rate")
    ax.legend()
    fig.tight_layout()
    OUT.mkdir(exist_ok=True)
    fig.savefig(OUT / "micro_batch.png", dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
