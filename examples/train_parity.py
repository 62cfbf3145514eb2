#!/usr/bin/env python3
"""Training parity on real data: exact BatchNorm vs the bs, fs (band; patch and grid too) and vdn presets, and
the policy ``fxbns.calibrate`` chooses per layer (on 4 training batches at initialisation: "calibrated" at the default
target error, "calibrated-0.05" at 0.05), and the fs preset's band at 1/4 of the map without and with
``sample_backward`` ("fs4", "fs4-sb").

Every BatchNorm is sampled (``min_elements=0``; the presets would keep layers under 2**18 (bs) or 2**19 (fs) elements exact).
Each trained model is evaluated twice: with the running statistics training left, and after ``fxbns.recalibrate``
(population statistics over one pass of the training set, no augmentation).  The mean sample fraction is the
share of a training batch's elements each site's statistics use (exact: 1), averaged over sites, and weighted
by the sites' element counts (the share of all BatchNorm input elements that are reduced).

A small ResNet and a MobileNet-style net on scikit-learn's bundled handwritten digits (upsampled to
32x32), the same schedule for all, several seeds.  Writes examples/results/train_parity.{json,png}.

    python examples/train_parity.py              # 3 seeds, 12 epochs (about 9 minutes per policy on 2 cores)
    python examples/train_parity.py --quick      # 1 seed, 3 epochs
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import OUT, SmallMobileNet, SmallResNet, evaluate, save_record, train  # noqa: E402

import fxbns  # noqa: E402
from fxbns import FeatureSampling, Policy  # noqa: E402
from fxbns.datasets import digits  # noqa: E402

POLICIES = {
    "exact": lambda: "exact",
    "bs": lambda: Policy.from_preset("bs").set_min_elements(0),
    "fs-patch": lambda: Policy(FeatureSampling(area_ratio=1 / 16, layout="patch", per_sample=True)),
    "fs-grid": lambda: Policy(FeatureSampling(area_ratio=1 / 16, layout="grid", per_sample=True)),
    "fs": lambda: Policy.from_preset("fs").set_min_elements(0),  # the preset (band layout, per-sample offsets) on every layer
    # the fs preset's band at 1/4 of the map, the smallest sample sample_backward applies to, without and with it
    "fs4": lambda: Policy(FeatureSampling(area_ratio=1 / 4, layout="band", per_sample=True)),
    "fs4-sb": lambda: Policy(FeatureSampling(area_ratio=1 / 4, layout="band", per_sample=True,
                                             sample_backward=True)),
    # a stride-2 grid (1/4 of the map, per-sample offsets), without and with sample_backward: its values are
    # spaced out, where a band's are neighbours
    "fs4-grid": lambda: Policy(FeatureSampling(area_ratio=1 / 4, layout="grid", per_sample=True)),
    "fs4-grid-sb": lambda: Policy(FeatureSampling(area_ratio=1 / 4, layout="grid", per_sample=True,
                                                  sample_backward=True)),
    "vdn": lambda: "vdn",
    "calibrated": None,  # fxbns.calibrate on the model at initialisation, default target_error (see _policy)
    "calibrated-0.05": None,  # the same at target_error=0.05
}
MODELS = {"small-resnet": SmallResNet, "small-mobilenet": SmallMobileNet}


def _policy(pname, model, data, batch):
    """The policy to train with; for "calibrated[-TARGET]", fxbns.calibrate's choice on the first 4 training batches
    (at its default target_error, or at TARGET)."""
    if POLICIES[pname] is not None:
        return POLICIES[pname](), None
    xtr = data[0]
    target = {"target_error": float(pname.split("-", 1)[1])} if "-" in pname else {}
    cal = fxbns.calibrate(model, [xtr[i * batch:(i + 1) * batch] for i in range(4)], **target)
    return cal.policy, cal


def _fractions(gm) -> tuple[float, float]:
    """The fraction of a site's elements its statistics use (exact sites count 1): the mean over sites, and the
    mean weighted by the sites' element counts (the share of all BatchNorm input elements reduced)."""
    rows = fxbns.report(gm).rows
    fr = [1.0 if r["fraction"] is None or r["estimator"] == "exact" else r["fraction"] for r in rows]
    numel = [math.prod(r["shape"]) for r in rows]
    return sum(fr) / len(fr), sum(f * n for f, n in zip(fr, numel)) / sum(numel)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--policies", help="comma-separated subset; their results replace those in the existing record")
    ap.add_argument("--models", help=f"comma-separated subset of {', '.join(MODELS)}")
    ap.add_argument("--record", default="train_parity", help="name of the record and plot under examples/results "
                    "(default train_parity)")
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
        prev = OUT / f"{args.record}.json"
        if prev.exists():
            old = json.loads(prev.read_text())
            if all(old.get(k) == getattr(args, k) for k in ("epochs", "batch", "lr", "seeds")):
                results = old["results"]
                earlier = old["command"]
    t0 = time.time()
    models = {m: MODELS[m] for m in args.models.split(",")} if args.models else MODELS
    for mname, mcls in models.items():
        for pname in policies:
            runs = []
            for seed in range(args.seeds):
                torch.manual_seed(seed)
                model = mcls(num_classes=10)
                pol, cal = _policy(pname, model, data, args.batch)
                gm = fxbns.transform(model, pol, example_inputs=data[0][:args.batch])
                frac, efrac = _fractions(gm)
                acc, loss, curve = train(gm, data, epochs=args.epochs, batch=args.batch, lr=args.lr, seed=seed)
                xtr = data[0]
                n_b = len(xtr) // args.batch
                fxbns.recalibrate(gm, (xtr[i * args.batch:(i + 1) * args.batch] for i in range(n_b)), num_batches=n_b)
                racc, _ = evaluate(gm, data[2], data[3])
                run = {"seed": seed, "test_acc": acc, "test_loss": loss, "train_loss": curve,
                       "recalibrated_test_acc": racc, "mean_sample_fraction": frac,
                       "element_fraction": efrac}
                if cal is not None:
                    run["calibration"] = [{"name": r["name"], "spec": r["spec"].describe() if r["spec"] else "exact",
                                           "fraction": r["fraction"], "mean_error": r["mean_error"],
                                           "var_error": r["var_error"]} for r in cal.table]
                runs.append(run)
                print(f"{mname:16s} {pname:10s} seed {seed}: test acc {100 * acc:.2f}%, recalibrated {100 * racc:.2f}%, "
                      f"mean sample fraction {frac:.3f} (by elements {efrac:.3f})  ({time.time() - t0:.0f} s)", flush=True)
            accs = [r["test_acc"] for r in runs]
            raccs = [r["recalibrated_test_acc"] for r in runs]
            results.setdefault(mname, {})[pname] = {
                "runs": runs, "mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "recalibrated_mean": statistics.mean(raccs),
                "recalibrated_std": statistics.stdev(raccs) if len(raccs) > 1 else 0.0,
                "mean_sample_fraction": statistics.mean(r["mean_sample_fraction"] for r in runs),
                "element_fraction": statistics.mean(r["element_fraction"] for r in runs)}
            # the record so far (an interrupted run keeps the policies it finished), replaced at the end
            save_record(args.record, {"command": "python examples/train_parity.py " + " ".join(sys.argv[1:]),
                                      "partial": True, "epochs": args.epochs, "batch": args.batch, "lr": args.lr,
                                      "seeds": args.seeds, "results": results})
    print(f"\n| model | preset | test accuracy (mean +- std over {args.seeds} seeds) | vs exact | after recalibrate | "
          f"vs exact after recalibrate | mean sample fraction (sites) | (elements) |")
    print("|---|---|---|---|---|---|---|---|")

    def _f(v):
        return "-" if v is None else f"{v:.3f}"

    for mname, res in results.items():
        base = res["exact"]["mean"]
        rbase = res["exact"].get("recalibrated_mean")
        for pname, r in res.items():
            d = 100 * (r["mean"] - base)
            rec = r.get("recalibrated_mean")
            rtxt = "-" if rec is None else f"{100 * rec:.2f} +- {100 * r['recalibrated_std']:.2f}"
            rd = "" if rec is None or rbase is None or pname == "exact" else f"{100 * (rec - rbase):+.2f}"
            print(f"| {mname} | {pname} | {100 * r['mean']:.2f} +- {100 * r['std']:.2f} | "
                  f"{'' if pname == 'exact' else f'{d:+.2f}'} | {rtxt} | {rd} | {_f(r.get('mean_sample_fraction'))} | "
                  f"{_f(r.get('element_fraction'))} |")
    goal = all(abs(r["mean"] - res["exact"]["mean"]) <= 0.005 for res in results.values() for r in res.values())
    print(f"\ngoal (every preset within 0.5 points of exact BN): {'met' if goal else 'NOT met'}")
    cal_goal = {}
    for mname, res in results.items():
        fs = res.get("fs")
        for pname, c in res.items():
            if not pname.startswith("calibrated") or fs is None:
                continue
            g = {"accuracy_vs_exact": c["mean"] - res["exact"]["mean"]}
            for key in ("mean_sample_fraction", "element_fraction"):
                g[key], g["fs_" + key] = c.get(key), fs.get(key)
            g["met"] = abs(g["accuracy_vs_exact"]) <= 0.005 and all(
                g[k] is not None and g["fs_" + k] is not None and g[k] < g["fs_" + k]
                for k in ("mean_sample_fraction", "element_fraction"))
            cal_goal.setdefault(mname, {})[pname] = g
            print(f"{mname}: {pname} {100 * g['accuracy_vs_exact']:+.2f} points vs exact at mean sample fraction "
                  f"{_f(g['mean_sample_fraction'])} by sites, {_f(g['element_fraction'])} by elements (fs preset "
                  f"{_f(g['fs_mean_sample_fraction'])}, {_f(g['fs_element_fraction'])}): goal (within 0.5 points, "
                  f"smaller fraction than fs) {'met' if g['met'] else 'NOT met'}")
    command = "python examples/train_parity.py " + " ".join(sys.argv[1:])
    if earlier:
        command = f"{earlier}; then {command}"
    rec = save_record(args.record, {"command": command,
                                       "data": "sklearn digits 32x32", "epochs": args.epochs, "batch": args.batch,
                                       "lr": args.lr, "seeds": args.seeds, "results": results, "goal_met": goal,
                                       "calibrated_goal": cal_goal})
    _plot(results, args)
    print(f"record: {rec}\nplot: {OUT / (args.record + '.png')}")
    return 0


def _plot(results, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (mname, res) in zip(axes[0], results.items()):
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
    fig.savefig(OUT / f"{args.record}.png", dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
