#!/usr/bin/env python3
"""Gradient size in the first training steps of deep torchvision models, per preset, with and without
``sample_backward``: does the sampled backward keep gradients at the size exact BatchNorm gives?

``sample_backward`` puts the statistics' term of the backward on the sampled elements only, scaled by the
inverse sampling ratio (8x for ``bs``, 16x for ``fs``), with the sums estimated from the sample; each layer's
estimate then reads the previous layer's concentrated terms.  This script measures what that does to the
gradient norm and the loss over the first steps (random inputs and labels, the benchmark's models and
sizes, SGD lr 0.01 momentum 0.9, the same initial weights for every preset).  Writes
examples/results/gradient_stability.json.

    python examples/gradient_stability.py                 # resnet50 and mobilenet_v2, 8 steps (about 2 minutes)
    python examples/gradient_stability.py --models resnet18 --steps 4
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import save_record  # noqa: E402

from fxbns import Policy, transform  # noqa: E402

SIZES = {"resnet50": (16, 64), "mobilenet_v2": (32, 64), "resnet18": (64, 32), "densenet121": (16, 64),
         "efficientnet_b0": (16, 96)}
PRESETS = ["exact", "bs", "bs_sb", "fs", "fs_sb"]


def run(model_name: str, preset: str, steps: int) -> list[dict]:
    batch, size = SIZES[model_name]
    torch.manual_seed(0)
    base = torchvision.models.get_model(model_name, weights=None, num_classes=100)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 100, (batch,))
    policy = Policy.from_preset(preset.removesuffix("_sb"))
    if preset.endswith("_sb"):
        policy.set_sample_backward()
    model = transform(copy.deepcopy(base), policy, example_inputs=x[:2])
    # no dropout noise: every preset sees the same function of its weights
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    out = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in model.parameters() if p.grad is not None))
        out.append({"loss": loss.item(), "grad_norm": norm})
        opt.step()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet50,mobilenet_v2")
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    rows = []
    for name in args.models.split(","):
        if name not in SIZES:
            ap.error(f"unknown model {name!r}; choose from {', '.join(SIZES)}")
        for preset in PRESETS:
            steps = run(name, preset, args.steps)
            rows.append({"model": name, "preset": preset, "steps": steps})
            print(f"{name:14s} {preset:6s} grad norm step 1 {steps[0]['grad_norm']:10.3g}  max "
                  f"{max(s['grad_norm'] for s in steps):10.3g}  loss {steps[0]['loss']:.3f} -> {steps[-1]['loss']:.3f}",
                  flush=True)
    path = save_record("gradient_stability", {"command": "python examples/gradient_stability.py " +
                                              " ".join(sys.argv[1:]), "rows": rows})
    print(f"record: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
