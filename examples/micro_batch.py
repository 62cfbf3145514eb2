#!/usr/bin/env python3
"""Micro-batch training on real data: exact BatchNorm vs GroupNorm vs the fxbns ``micro`` preset.

A small ResNet on scikit-learn's bundled digits (32x32) at batch 1, 2, 4, and 32 for reference; the
same number of epochs for all, learning rate scaled linearly with the batch.  GroupNorm (8 groups) is
swapped in by this script as the usual alternative.  Writes examples/results/micro_batch.{json,png}.

    python examples/micro_batch.py             # batch 1, 2, 4, 32; 2 epochs; 1 seed (about 12 minutes)
    python examples/micro_batch.py --quick     # fewer training images
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import OUT, SmallResNet, save_record, train  # noqa: E402

import fxbns  # noqa: E402
from fxbns import Policy  # noqa: E402
from fxbns.datasets import digits  # noqa: E402


def build(kind: str, x):
    if kind == "groupnorm":
        return SmallResNet(norm="gn")
    model = SmallResNet(norm="bn")
    # every layer sampled at batch 32 too (min_elements=0), as when this record was made
    policy = "exact" if kind == "batchnorm" else Policy.from_preset("micro").set_min_elements(0)
    return fxbns.transform(model, policy, example_inputs=x[:2])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,2,4,32")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--lr32", type=float, default=0.1, help="learning rate at batch 32 (scaled linearly)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    data = digits(size=32, seed=0)
    if args.quick:
        data = (data[0][:400], data[1][:400], data[2], data[3])
    kinds = ["batchnorm", "groupnorm", "micro"]
    results: dict = {}
    t0 = time.time()
    for b in (int(v) for v in args.batches.split(",")):
        for kind in kinds:
            accs = []
            for seed in range(args.seeds):
                torch.manual_seed(seed)
                model = build(kind, data[0])
                lr = args.lr32 * b / 32
                acc, _, curve = train(model, data, epochs=args.epochs, batch=b, lr=lr, seed=seed)
                accs.append(acc)
                print(f"batch {b:2d} {kind:10s} seed {seed}: test acc {100 * acc:.2f}%  ({time.time() - t0:.0f} s)",
                      flush=True)
            results.setdefault(str(b), {})[kind] = {"test_acc": accs, "mean": sum(accs) / len(accs)}
    print("\n| batch | BatchNorm | GroupNorm | fxbns micro |")
    print("|---|---|---|---|")
    for b, r in results.items():
        print(f"| {b} | " + " | ".join(f"{100 * r[k]['mean']:.2f}%" for k in kinds) + " |")
    goals = {}
    for b in ("1", "2"):
        if b in results:
            goals[f"micro >= groupnorm at batch {b}"] = results[b]["micro"]["mean"] >= results[b]["groupnorm"]["mean"]
    if "1" in results:
        goals["micro far above batchnorm at batch 1 (+20 points)"] = \
            results["1"]["micro"]["mean"] >= results["1"]["batchnorm"]["mean"] + 0.20
    for g, ok in goals.items():
        print(f"goal: {g}: {'met' if ok else 'NOT met'}")
    rec = save_record("micro_batch", {"command": "python examples/micro_batch.py " + " ".join(sys.argv[1:]),
                                      "data": "sklearn digits 32x32" + (" (400 train images)" if args.quick else ""),
                                      "epochs": args.epochs, "lr_at_32": args.lr32, "results": results,
                                      "goals": goals})
    _plot(results, kinds)
    print(f"record: {rec}\nplot: {OUT / 'micro_batch.png'}")
    return 0


def _plot(results, kinds) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    bs = list(results)
    for k in kinds:
        ax.plot(range(len(bs)), [100 * results[b][k]["mean"] for b in bs], marker="o", label=k)
    ax.set_xticks(range(len(bs)), bs)
    ax.set_xlabel("batch size")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("micro-batch training, small ResNet on digits")
    ax.legend()
    fig.tight_layout()
    OUT.mkdir(exist_ok=True)
    fig.savefig(OUT / "micro_batch.png", dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
