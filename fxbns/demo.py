"""The main job on an embedded default, no arguments needed (``bash scripts/demo.sh``):

1. build a torchvision ResNet-18 (10 classes) in code and rewrite it with the ``fs`` preset;
2. print the per-layer report;
3. train a few epochs on scikit-learn's bundled handwritten digits (real data, no download), beside an
   identical model with plain BatchNorm, and compare test accuracy and step time;
4. export the trained model to ONNX and check it in onnxruntime (outputs and accuracy).
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

import torch
import torch.nn.functional as F
import torchvision

import fxbns
from fxbns.datasets import digits


def _accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="fs")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--onnx", default=None, help="where to write the ONNX file (default: a temporary folder)")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    xtr, ytr, xte, yte = digits(size=32, seed=args.seed)
    print(f"data: scikit-learn digits, {len(ytr)} train / {len(yte)} test images, 32x32")

    base = torchvision.models.resnet18(num_classes=10)
    exact = copy.deepcopy(base)
    gm = fxbns.transform(base, args.policy, example_inputs=xtr[: args.batch])
    print(fxbns.report(gm))

    models = {"exact BN": exact, f"fxbns {args.policy}": gm}
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4) for k, m in models.items()}
    step_time = {k: 0.0 for k in models}
    g = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        perm = torch.randperm(len(ytr), generator=g)
        for i in range(0, len(perm) - args.batch + 1, args.batch):
            idx = perm[i:i + args.batch]
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
    steps = args.epochs * (len(ytr) // args.batch)
    for k in models:
        print(f"{k}: {1000 * step_time[k] / steps:.1f} ms per training step (batch {args.batch}, CPU)")

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
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
