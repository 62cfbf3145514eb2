#!/usr/bin/env python3
"""Estimation error against sample size, on conv features of real photographs.

Crops of scikit-learn's two bundled photographs (32x32, batch 32) go through fixed random conv3x3 ->
ReLU -> conv3x3 layers (16 channels, zero padding): the input of a BatchNorm.  For each estimator and layout, the relative error of the mean
(|mean_hat - mean| / sigma) and of the variance (|var_hat - var| / var), averaged over channels and
200 draws, against the full-batch statistics; at 4, 16 and 64 points per sample (BS at the same total
count).  The effective sample size n_eff = sigma^2 / E[(mean_hat - mean)^2] (finite-population
corrected) says how many independent values a sample is worth; the within-image spatial
autocorrelation of the features predicts it for a contiguous patch.  Writes examples/results/estimation_error.{json,png}.

    python examples/estimation_error.py        # about a minute
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import OUT, save_record  # noqa: E402

from fxbns import BatchSampling, FeatureSampling  # noqa: E402
from fxbns.datasets import photo_crops  # noqa: E402
from fxbns.ops.reference import sample_moments  # noqa: E402
from fxbns.sampling import build_groups  # noqa: E402

LAYOUTS = {
    "BS (whole samples)": lambda side, n: BatchSampling(ratio=max(1, round(side * side * n / 1024)) / n),
    "patch, shared offset": lambda side, n: FeatureSampling(patch=(side, side)),
    "patch, per-sample offsets": lambda side, n: FeatureSampling(patch=(side, side), per_sample=True),
    "grid, shared offset": lambda side, n: FeatureSampling(patch=(side, side), layout="grid"),
    "grid, per-sample offsets": lambda side, n: FeatureSampling(patch=(side, side), layout="grid", per_sample=True),
    "band, shared offset": lambda side, n: FeatureSampling(patch=(side, side), layout="band"),
    "band, per-sample offsets (fs preset)": lambda side, n: FeatureSampling(patch=(side, side), layout="band",
                                                                            per_sample=True),
}


def features(seed: int = 0) -> torch.Tensor:
    """What a second BatchNorm sees: conv3x3 -> ReLU -> conv3x3 outputs (fixed random weights, zero padding)."""
    torch.manual_seed(seed)
    x = photo_crops(size=32, count=32, seed=seed)
    conv1, conv2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
    with torch.no_grad():
        return conv2(torch.relu(conv1(x)))


def errors(feat: torch.Tensor, spec, draws: int) -> dict:
    mean = feat.mean((0, 2, 3))
    var = feat.var((0, 2, 3), unbiased=False)
    em, ev, sq = [], [], []
    n = None
    for step in range(draws):
        groups = build_groups(spec, tuple(feat.shape), feat.shape[0], 0, torch.tensor(step), seed=17)
        m, v = sample_moments(feat, groups)
        n = groups[0].count
        em.append(((m - mean).abs() / var.sqrt()).mean())
        ev.append(((v - var).abs() / var).mean())
        sq.append(((m - mean) ** 2 / var).mean())
    total = feat.numel() // feat.shape[1]
    mse = float(torch.stack(sq).mean())
    n_eff = 1.0 / (mse + 1.0 / total) if mse > 0 else float("inf")  # mse = 1/n_eff - 1/N (fpc)
    return {"n": n, "mean_rel_err": float(torch.stack(em).mean()), "var_rel_err": float(torch.stack(ev).mean()),
            "n_eff": n_eff, "iid_mean_rel_err": math.sqrt(2 / math.pi) * math.sqrt(max(1 / n - 1 / total, 0))}


def within_image(feat: torch.Tensor, max_lag: int = 8) -> tuple[list[float], float]:
    """Spatial autocorrelation *within* each image (lags 0..max_lag, horizontal and vertical pooled), and
    the share of the total variance that lies within images (the rest is between-image)."""
    w = feat - feat.mean((2, 3), keepdim=True)
    within = w.pow(2).mean((0, 2, 3))
    share = float((within / feat.var((0, 2, 3), unbiased=False)).mean())
    z = w / within.sqrt().view(1, -1, 1, 1)
    rho = []
    for d in range(max_lag + 1):
        h = (z[..., :, : z.shape[-1] - d] * z[..., :, d:]).mean()
        v = (z[..., : z.shape[-2] - d, :] * z[..., d:, :]).mean()
        rho.append(float((h + v) / 2))
    return rho, share


def patch_n_eff(rho: list[float], share: float, side: int, n_rows: int) -> float:
    """Predicted n_eff of one side x side patch per sample (random per-sample offsets), for a separable
    within-image correlation rho(dx) rho(dy): Var(mean_hat) = share * sigma^2 * (S/side^2)^2 / n_rows with
    S = sum_{i,k < side} rho(|i-k|); the between-image part is fully covered (every sample is in)."""
    S = sum(rho[abs(i - k)] if abs(i - k) < len(rho) else 0.0 for i in range(side) for k in range(side))
    var_ratio = share * (S / side ** 2) ** 2 / n_rows
    return 1.0 / var_ratio


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draws", type=int, default=200)
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot from the existing record")
    args = ap.parse_args()
    if args.plot_only:
        _plot(json.loads((OUT / "estimation_error.json").read_text())["results"])
        print(f"plot: {OUT / 'estimation_error.png'}")
        return 0
    feat = features()
    rho, share = within_image(feat)
    results = {}
    print(f"features: {tuple(feat.shape)}; {100 * share:.0f}% of the variance lies within images; within-image "
          f"spatial autocorrelation at lags 0..8: " + ", ".join(f"{v:.2f}" for v in rho))
    print("\n| points per sample | layout | n | mean err / sigma | iid mean err | var rel err | n_eff | "
          "n_eff from autocorrelation |")
    print("|---|---|---|---|---|---|---|---|")
    for side in (2, 4, 8):
        for name, make in LAYOUTS.items():
            r = errors(feat, make(side, feat.shape[0]), args.draws)
            if name == "patch, per-sample offsets":
                r["n_eff_predicted"] = patch_n_eff(rho, share, side, feat.shape[0])
            results.setdefault(str(side * side), {})[name] = r
            pred = f"{r['n_eff_predicted']:.0f}" if "n_eff_predicted" in r else ""
            print(f"| {side * side} | {name} | {r['n']} | {r['mean_rel_err']:.3f} | {r['iid_mean_rel_err']:.3f} | "
                  f"{r['var_rel_err']:.3f} | {r['n_eff']:.0f} | {pred} |")
    rec = save_record("estimation_error", {"command": "python examples/estimation_error.py " + " ".join(sys.argv[1:]),
                                           "data": "sklearn sample photographs, 32 crops 32x32, random conv3x3-ReLU-conv3x3",
                                           "within_image_autocorrelation": rho, "within_image_variance_share": share,
                                           "results": results})
    _plot(results)
    print(f"record: {rec}\nplot: {OUT / 'estimation_error.png'}")
    return 0


def _plot(results) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    pts = list(results)
    for name in LAYOUTS:
        ns = [results[p][name]["n"] for p in pts]
        axes[0].plot(ns, [results[p][name]["mean_rel_err"] for p in pts], marker="o", label=name)
        axes[1].plot(ns, [results[p][name]["var_rel_err"] for p in pts], marker="o", label=name)
    ns = [results[p]["patch, shared offset"]["n"] for p in pts]
    axes[0].plot(ns, [results[p]["patch, shared offset"]["iid_mean_rel_err"] for p in pts], "k--", label="iid values (expected error)")
    from matplotlib.ticker import NullFormatter, NullLocator

    for ax, t in zip(axes, ["mean: |error| / sigma", "variance: |error| / var"]):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_locator(NullLocator())  # one label per measured n, none in between
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(sorted(set(ns)), [str(n) for n in sorted(set(ns))])
        ax.set_xlabel("sampled elements per channel (n)")
        ax.set_title(t)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    OUT.mkdir(exist_ok=True)
    fig.savefig(OUT / "estimation_error.png", dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
