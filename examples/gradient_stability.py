#!/usr/bin/env python3
"""Gradient size in the first training steps of deep torchvision models, per preset, with and without
``sample_backward``: does the sampled backward keep gradients at the size exact BatchNorm gives?

``sample_backward`` feeds BatchNorm's own backward formula the two sums estimated from the sample, on every
element, where the sample is an FS sample of at least 1/4 of the layer (fxbns.ops.dispatch); the default
presets are exact, bs, fs (at their 1/8 and 1/16) and fs4 (the fs preset at 1/4) without and with it.  Over the first training steps (random inputs and labels, SGD lr 0.01 momentum 0.9, the same initial
weights for every preset) this script records, per step, the gradient norm, and the norm ratio and cosine
similarity against exact BatchNorm's gradient at the same weights (an exact twin loaded with the run's state).
A control row per model gives the cosine of exact BatchNorm's gradient against itself on the input plus 1% noise:
from random weights the direction is chaotic, so the norm ratio is the measure of stability.
Writes examples/results/gradient_stability.json (``--record``).

    python examples/gradient_stability.py                 # resnet50 and mobilenet_v2, 20 steps
    python examples/gradient_stability.py --presets fs_sb,bs_sb --sb-fraction 0 --record gradient_stability_sb0
    python examples/gradient_stability.py --models resnet18 --steps 4
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import save_record  # noqa: E402

from fxbns import Policy, transform  # noqa: E402
from fxbns.ops import dispatch  # noqa: E402

SIZES = {"resnet50": (16, 64), "mobilenet_v2": (32, 64), "resnet18": (64, 32), "densenet121": (16, 64),
         "efficientnet_b0": (16, 96)}
PRESETS = ["exact", "bs", "fs", "fs4", "fs4_sb"]
#: every preset name, with an "_sb" suffix for sample_backward on; "fs4" is the fs preset at area_ratio 1/4, the
#: smallest sample sample_backward applies to (fxbns.ops.dispatch.MIN_SAMPLE_BACKWARD_FRACTION)
CHOICES = ["exact", "bs", "bs_sb", "fs", "fs_sb", "fs4", "fs4_sb"]


def _policy(preset: str) -> Policy:
    name = preset.removesuffix("_sb")
    policy = Policy.from_preset("fs" if name == "fs4" else name)
    if name == "fs4":
        policy = Policy(dataclasses.replace(policy.default, area_ratio=1 / 4))
    return policy.set_sample_backward() if preset.endswith("_sb") else policy


def run(model_name: str, preset: str, steps: int) -> list[dict]:
    batch, size = SIZES[model_name]
    torch.manual_seed(0)
    base = torchvision.models.get_model(model_name, weights=None, num_classes=100)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 100, (batch,))
    policy = _policy(preset)
    model = transform(copy.deepcopy(base), policy, example_inputs=x[:2])
    twin = copy.deepcopy(base)  # exact BatchNorm, loaded with the run's weights at every step
    # no dropout noise: every preset sees the same function of its weights
    for m in list(model.modules()) + list(twin.modules()):
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    out = []
    for _ in range(steps):
        twin.load_state_dict(model.state_dict())
        twin.train()
        twin.zero_grad(set_to_none=True)
        F.cross_entropy(twin(x), y).backward()
        ref = torch.cat([p.grad.double().flatten() for p in twin.parameters() if p.grad is not None])
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        g = torch.cat([p.grad.double().flatten() for p in model.parameters() if p.grad is not None])
        norm = float(g.norm())
        out.append({"loss": loss.item(), "grad_norm": norm, "norm_ratio": norm / float(ref.norm()),
                    "cosine": float(torch.nn.functional.cosine_similarity(g, ref, dim=0))})
        opt.step()
    return out


def control(model_name: str) -> dict:
    """How far the gradient's direction moves at all: exact BatchNorm at the initial weights, the batch against the
    batch plus 1% Gaussian noise.  From random weights the direction is chaotic (a cosine far below 1 for a tiny
    change of input), so the cosine columns say little; the norm ratio is the stability measure."""
    batch, size = SIZES[model_name]
    torch.manual_seed(0)
    m = torchvision.models.get_model(model_name, weights=None, num_classes=100)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 100, (batch,))
    grads = []
    for inp in (x, x + 0.01 * torch.randn_like(x)):
        m.zero_grad(set_to_none=True)
        F.cross_entropy(m(inp), y).backward()
        grads.append(torch.cat([p.grad.double().flatten() for p in m.parameters() if p.grad is not None]))
    return {"input_noise": 0.01, "cosine": float(torch.nn.functional.cosine_similarity(*grads, dim=0)),
            "norm_ratio": float(grads[1].norm() / grads[0].norm())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet50,mobilenet_v2")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--presets", default=",".join(PRESETS), help=f"comma-separated, of {', '.join(CHOICES)}")
    ap.add_argument("--sb-fraction", type=float, help="set fxbns.ops.dispatch.MIN_SAMPLE_BACKWARD_FRACTION (the "
                    "smallest share of a layer sample_backward applies to; default 0.25): 0 applies it to the "
                    "presets' own 1/16 and 1/8 samples")
    ap.add_argument("--record", default="gradient_stability", help="name of the record under examples/results")
    args = ap.parse_args()
    if args.sb_fraction is not None:
        dispatch.MIN_SAMPLE_BACKWARD_FRACTION = args.sb_fraction
    rows = []
    for name in args.models.split(","):
        if name not in SIZES:
            ap.error(f"unknown model {name!r}; choose from {', '.join(SIZES)}")
        c = control(name)
        rows.append({"model": name, "preset": "control", **c})
        print(f"{name:14s} control: exact BatchNorm, input + 1% noise: cosine {c['cosine']:.3f}, norm ratio "
              f"{c['norm_ratio']:.3f}", flush=True)
        for preset in args.presets.split(","):
            if preset not in CHOICES:
                ap.error(f"unknown preset {preset!r}; choose from {', '.join(CHOICES)}")
            steps = run(name, preset, args.steps)
            rows.append({"model": name, "preset": preset, "steps": steps})
            ratios = [s["norm_ratio"] for s in steps]
            cos = [s["cosine"] for s in steps]
            print(f"{name:14s} {preset:6s} grad norm / exact's {min(ratios):6.3f}-{max(ratios):6.3f}  cosine "
                  f"{min(cos):6.3f}-{max(cos):6.3f}  loss {steps[0]['loss']:.3f} -> {steps[-1]['loss']:.3f}",
                  flush=True)
    path = save_record(args.record, {"command": "python examples/gradient_stability.py " +
                                              " ".join(sys.argv[1:]), "rows": rows,
                                              "min_sample_backward_fraction": dispatch.MIN_SAMPLE_BACKWARD_FRACTION})
    print(f"record: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
