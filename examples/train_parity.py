#!/usr/bin/env python3
"""Training parity on real data: exact BatchNorm vs the bs, fs (band; patch and grid too) and vdn presets.

Every BatchNorm is sampled (``min_elements=0``; the presets would keep layers under 2**18 (bs) or 2**19 (fs) elements exact).

A small ResNet and a MobileNet-style net on scikit-learn's bundled handwritten digits (upsampled to
32x32), the same schedule for all, several seeds.  Writes examples/results/train_parity.{json,png}.

    python examples/train_parity.py              # 3 seeds, 12 epochs (about 10 minutes on 2 cores)
    python examples/train_parity.py --quick      # 1 seed, 3 epochs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import OUT, SmallMobileNet, SmallResNet, save_record, train  # noqa: E402

import fxbns  # noqa: E402
from fxbns import FeatureSampling, Policy  # noqa: E402
from fxbns.datasets import digits  # noqa: E402

POLICIES = {
    "exact": lambda: "exact",
    "bs": lambda: Policy.from_preset("bs").set_min_elements(0),
    "fs-patch": lambda: Policy(FeatureSampling(area_ratio=1 / 16, layout="patch", per_sample=True)),
    "fs-grid": lambda: Policy(FeatureSampling(area_ratio=1 / 16, layout="grid", per_sample=True)),
    "fs": lambda: Policy.from_preset("fs").set_min_elements(0),  # the preset (band layout, per-sample offsets) on every layer
    "vdn": lambda: "vdn",
}
MODELS = {"small-resnet": SmallResNet, "small-mobilenet": SmallMobileNet}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--policies", help="comma-separated subset; their results replace those in the existing record")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.epochs = 1, 3
    torch.set_num_threads(2)
    data = digits(size=32, seed=0)
    results = {}
    earlier = None
    policies = POLICIES
    if args.policies:
        policies = {p: POLICIES[p] for p in args.policies.split(",")}
        prev = OUT / "train_parity.json"
        if prev.exists():
            old = json.loads(prev.read_text())
            if all(old.get(k) == getattr(args, k) for k in ("epochs", "batch", "lr", "seeds")):
                results = old["results"]
                earlier = old["command"]
    t0 = time.time()
    for mname, mcls in MODELS.items():
        for pname, pol in policies.items():
            runs = []
            for seed in range(args.seeds):
                torch.manual_seed(seed)
                model = mcls(num_classes=10)
                gm = fxbns.transform(model, pol(), example_inputs=data[0][:2])
                acc, loss, curve = train(gm, data, epochs=args.epochs, batch=args.batch, lr=args.lr, seed=seed)
                runs.append({"seed": seed, "test_acc": acc, "test_loss": loss, "train_loss": curve})
                print(f"{mname:16s} {pname:9s} seed {seed}: test acc {100 * acc:.2f}%  ({time.time() - t0:.0f} s)",
                      flush=True)
            accs = [r["test_acc"] for r in runs]
            results.setdefault(mname, {})[pname] = {
                "runs": runs, "mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0}
    print(f"\n| model | preset | test accuracy (mean +- std over {args.seeds} seeds) | vs exact |")
    print("|---|---|---|---|")
    for mname, res in results.items():
        base = res["exact"]["mean"]
        for pname, r in res.items():
            d = 100 * (r["mean"] - base)
            print(f"| {mname} | {pname} | {100 * r['mean']:.2f} +- {100 * r['std']:.2f} | "
                  f"{'' if pname == 'exact' else f'{d:+.2f}'} |")
    goal = all(abs(r["mean"] - res["exact"]["mean"]) <= 0.005 for res in results.values() for r in res.values())
    print(f"\ngoal (every preset within 0.5 points of exact BN): {'met' if goal else 'NOT met'}")
    command = "python examples/train_parity.py " + " ".join(sys.argv[1:])
    if earlier:
        command = f"{earlier}; then {command}"
    rec = save_record("train_parity", {"command": command,
                                       "data": "sklearn digits 32x32", "epochs": args.epochs, "batch": args.batch,
                                       "lr": args.lr, "seeds": args.seeds, "results": results, "goal_met": goal})
    _plot(results, args)
    print(f"record: {rec}\nplot: {OUT / 'train_parity.png'}")
    return 0


def _plot(results, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4))
    for ax, (mname, res) in zip(axes, results.items()):
        for pname, r in res.items():
            curves = torch.tensor([run["train_loss"] for run in r["runs"]])
            ax.plot(range(1, args.epochs + 1), curves.mean(0),
                    label=f"{pname} ({100 * r['mean']:.2f}% +- {100 * r['std']:.2f})")
        ax.set_yscale("log")
        ax.set_title(f"{mname}: train loss (mean of {args.seeds} seeds)")
        ax.set_xlabel("epoch")
        ax.legend(title="preset (test acc)")
    fig.tight_layout()
    OUT.mkdir(exist_ok=True)
    fig.savefig(OUT / "train_parity.png", dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
