"""The main job on an embedded default, no arguments needed (``bash scripts/demo.sh``):

1. build a torchvision ResNet-18 (10 classes) in code and rewrite it with the ``fs`` preset;
2. print the per-layer report at the training shape, and count the sites that sample there from the
   modules themselves (a sampled site's running mean moves to its sample's mean, not the batch's);
3. train a few epochs on scikit-learn's bundled handwritten digits (real data, no download), beside an
   identical model with plain BatchNorm on the same batches, and compare test accuracy and step time;
4. export the trained model to ONNX and check it in onnxruntime (outputs and accuracy).

Why 64x64 images at batch 64: the ``fs`` preset keeps exact statistics in layers under 2**19 elements
(N x C x max(H*W, 16)), where sampling costs more than it saves, and in eager CPU training also on maps of
2-4 elements (exact is faster there).  At batch 64 and 64x64 the stem and the first two stages of ResNet-18
are at or above 2**19 elements (64x64x32x32, 64x64x16x16, 64x128x8x8), so 10 of its 20 BatchNorms sample;
stages 3 and 4 (4x4 and 2x2 maps) stay exact.  At 32x32 only the stem would sample.  ``--size 48 --batch 128``
samples 15 of 20 in less compute, but with half the optimizer steps it needs more epochs to reach the same
accuracy.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision

import fxbns
from fxbns.datasets import digits
from fxbns.modules import SampledBatchNorm

__all__ = ["main", "run", "sampled_sites", "DemoResult"]


def _accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def sampled_sites(model: torch.nn.Module, x: torch.Tensor) -> list[str]:
    """The BatchNorm sites of a transformed model that sample in a training step on ``x``, found by running one
    training forward on a copy: a site that computes exact statistics moves its running mean to the batch's
    mean; one that samples, to its sample's.

    Args:
        model: a model returned by :func:`fxbns.transform` (not changed).
        x: a training batch.

    Returns:
        The qualified names of the sites that sampled.

    >>> import torch, fxbns
    >>> m = fxbns.transform(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)), "bs")
    >>> sampled_sites(m, torch.randn(64, 3, 66, 66)), sampled_sites(m, torch.randn(2, 3, 10, 10))
    (['1'], [])
    """
    twin = copy.deepcopy(model).train()
    seen: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    handles = []
    for name, m in twin.named_modules():
        if isinstance(m, SampledBatchNorm) and m.track_running_stats and m.momentum is not None:
            def pre(mod, args, name=name):
                dims = [0] + list(range(2, args[0].dim()))
                seen.setdefault(name, (mod.running_mean.clone(), args[0].detach().mean(dims), mod.momentum))
            handles.append(m.register_forward_pre_hook(pre))
    with torch.no_grad():
        twin(x)
    for h in handles:
        h.remove()
    out = []
    for name, (before, batch_mean, momentum) in seen.items():
        exact = (1 - momentum) * before + momentum * batch_mean
        if not torch.allclose(twin.get_submodule(name).running_mean, exact, rtol=1e-4, atol=1e-6):
            out.append(name)
    return out


@dataclass
class DemoResult:
    """What :func:`run` did: the trained models, the sites that sampled, accuracies, step times."""

    ok: bool  # onnxruntime agrees with PyTorch
    model: torch.nn.Module  # the trained fxbns model
    sampled: list[str]  # sites that sampled at the training shape, before training (from the modules)
    sampled_after: list[str]  # the same, after training
    accuracy: dict[str, float]
    step_ms: dict[str, float]


def main(argv=None) -> int:
    """Run the demo.

    Args:
        argv: command-line arguments (``--help`` lists them); ``None``: ``sys.argv``.

    Returns:
        0 when onnxruntime agrees with PyTorch, else 1.
    """
    return 0 if run(argv).ok else 1


def run(argv=None) -> DemoResult:
    """The demo's steps (see the module docstring), printing as they go.

    Args:
        argv: command-line arguments, as for :func:`main`.

    Returns:
        A :class:`DemoResult`.
    """
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="fs")
    ap.add_argument("--size", type=int, default=64, help="image size (default 64: see above)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64, help="batch size (default 64: see above)")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--limit", type=int, default=None, help="train on the first N training images only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--onnx", default=None, help="where to write the ONNX file (default: a temporary folder)")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    xtr, ytr, xte, yte = digits(size=args.size, seed=args.seed)
    if args.limit is not None:
        xtr, ytr = xtr[: args.limit], ytr[: args.limit]
    print(f"data: scikit-learn digits, {len(ytr)} train / {len(yte)} test images, {args.size}x{args.size}")

    base = torchvision.models.resnet18(num_classes=10)
    exact = copy.deepcopy(base)
    gm = fxbns.transform(base, args.policy, example_inputs=xtr[: args.batch])
    print(fxbns.report(gm))
    ran = sampled_sites(gm, xtr[: args.batch])
    n_sites = sum(isinstance(m, SampledBatchNorm) for m in gm.modules())
    print(f"at the training shape (batch {args.batch}, {args.size}x{args.size}): {len(ran)} of {n_sites} "
          f"BatchNorms sample (counted from the modules: a sampled site's running mean moves to its sample's mean)")

    models = {"exact BN": exact, f"fxbns {args.policy}": gm}
    opts = {k: torch.optim.SGD(m.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4) for k, m in models.items()}
    step_time = {k: 0.0 for k in models}
    g = torch.Generator().manual_seed(args.seed)
    steps = 0
    accs: dict[str, float] = {}
    for epoch in range(args.epochs):
        perm = torch.randperm(len(ytr), generator=g)
        for i in range(0, len(perm) - args.batch + 1, args.batch):
            idx = perm[i:i + args.batch]
            steps += 1
            for k, m in models.items():  # same batches, interleaved
                m.train()
                t0 = time.perf_counter()
                opts[k].zero_grad(set_to_none=True)
                loss = F.cross_entropy(m(xtr[idx]), ytr[idx])
                loss.backward()
                opts[k].step()
                step_time[k] += time.perf_counter() - t0
        accs = {k: _accuracy(m, xte, yte) for k, m in models.items()}
        print(f"epoch {epoch + 1}: " + ", ".join(f"{k} test acc {100 * a:.1f}%" for k, a in accs.items()))
    for k in models:
        print(f"{k}: {1000 * step_time[k] / max(steps, 1):.1f} ms per training step (batch {args.batch}, "
              f"{args.size}x{args.size}, CPU, {steps} steps)")

    folder = tempfile.mkdtemp(prefix="fxbns-demo-")
    path = args.onnx or os.path.join(folder, "resnet18_fxbns.onnx")
    res = fxbns.export_onnx(gm, xte[:8], path)
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=res.providers)
    logits = sess.run(None, {sess.get_inputs()[0].name: xte.numpy()})[0]
    ort_acc = float((torch.from_numpy(logits).argmax(1) == yte).float().mean())
    torch_acc = _accuracy(gm, xte, yte)
    print(f"onnx: {path} ({res.exporter} exporter, {res.bn_folded} BatchNorms folded, {res.onnx_nodes} nodes); "
          f"onnxruntime {res.providers[0]}: max relative error {res.max_error:.1e}, test acc {100 * ort_acc:.1f}% "
          f"(PyTorch {100 * torch_acc:.1f}%)")
    ok = res.max_error < 1e-4 and abs(ort_acc - torch_acc) < 1e-6
    print("demo: OK" if ok else "demo: MISMATCH between onnxruntime and PyTorch")
    ms = {k: 1000 * step_time[k] / max(steps, 1) for k in models}
    return DemoResult(ok, gm, ran, sampled_sites(gm, xtr[: args.batch]), accs, ms)


if __name__ == "__main__":
    raise SystemExit(main())
