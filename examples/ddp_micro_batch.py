#!/usr/bin/env python3
"""Micro-batches across 2 ranks: per-rank statistics against statistics synchronized over the ranks.

The small ResNet on scikit-learn's bundled digits, DistributedDataParallel with 2 gloo ranks on the CPU, at a
per-rank batch of 1 and 2, for:

- ``batchnorm``: per-rank nn.BatchNorm (each rank normalises its own 1 or 2 images);
- ``groupnorm``: GroupNorm (8 groups), the usual alternative;
- ``micro``: the fxbns ``micro`` preset per rank (the real rows pooled with 4 virtual samples);
- ``sync_exact``: fxbns exact statistics synchronized over both ranks (``Policy.set_sync``);
- ``sync_fs``: fxbns feature sampling (a 1/4 band of every map, every layer) synchronized over both ranks.

Every sampled layer is sampled (``min_elements=0``); the learning rate scales with the global batch.  Writes
examples/results/ddp_micro_batch.{json,png}.

    python examples/ddp_micro_batch.py              # 16x16 images, 500 training images, 2 epochs (~7 min here)
    python examples/ddp_micro_batch.py --train 1348 --epochs 2   # the whole training set
"""

from __future__ import annotations

import argparse
import datetime
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import OUT, SmallResNet, evaluate, save_record  # noqa: E402
from ddp_train import train_ddp  # noqa: E402

import fxbns  # noqa: E402
from fxbns.datasets import digits  # noqa: E402

KINDS = ["batchnorm", "groupnorm", "micro", "sync_exact", "sync_fs"]
WORLD = 2


def build(kind: str, x: torch.Tensor) -> torch.nn.Module:
    if kind == "groupnorm":
        return SmallResNet(norm="gn")
    if kind == "batchnorm":
        return SmallResNet(norm="bn")
    if kind == "micro":
        policy = fxbns.Policy.from_preset("micro").set_min_elements(0)
    elif kind == "sync_exact":
        policy = fxbns.Policy.from_preset("exact").set_sync()
    else:  # a 1/4 band of every map (the fs preset's 1/16 band is a single element per image on 4x4 maps)
        policy = fxbns.Policy(fxbns.FeatureSampling(area_ratio=0.25, layout="band", per_sample=True)).set_sync()
    return fxbns.transform(SmallResNet(norm="bn"), policy, example_inputs=x[:2])


def worker(rank: int, port: int, args, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        data = digits(size=args.size, seed=0)
        data = (data[0][:args.train], data[1][:args.train], data[2], data[3])
        for b in args.batches:
            for kind in KINDS:
                t0 = time.time()
                torch.manual_seed(0)
                model = build(kind, data[0])
                lr = args.lr32 * b * WORLD / 32
                ddp = train_ddp(model, data, epochs=args.epochs, batch=b, lr=lr, seed=0, device=torch.device("cpu"))
                if rank == 0:
                    acc, _ = evaluate(ddp.module, data[2], data[3])
                    queue.put((b, kind, acc, time.time() - t0))
                    print(f"per-rank batch {b} {kind:10s}: test acc {100 * acc:.2f}% ({time.time() - t0:.0f} s)",
                          flush=True)
                dist.barrier()
    finally:
        dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,2", help="per-rank batches")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train", type=int, default=500, help="training images (of 1348; the test set is all 449)")
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--lr32", type=float, default=0.3, help="learning rate at a global batch of 32 (scaled)")
    args = ap.parse_args()
    args.batches = [int(v) for v in args.batches.split(",")]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(worker, args=(port, args, queue), nprocs=WORLD)
    results: dict = {}
    while not queue.empty():
        b, kind, acc, secs = queue.get()
        results.setdefault(str(b), {})[kind] = {"test_acc": acc, "seconds": round(secs, 1)}
    print("\n| per-rank batch (global) | " + " | ".join(KINDS) + " |")
    print("|---|" + "---|" * len(KINDS))
    for b, r in results.items():
        print(f"| {b} ({WORLD * int(b)}) | " + " | ".join(f"{100 * r[k]['test_acc']:.2f}%" for k in KINDS) + " |")
    rec = save_record("ddp_micro_batch", {
        "command": "python examples/ddp_micro_batch.py " + " ".join(sys.argv[1:]),
        "data": f"sklearn digits {args.size}x{args.size}, {args.train} training images, 449 test images", "ranks": WORLD, "backend": "gloo (CPU)",
        "epochs": args.epochs, "lr_at_global_32": args.lr32, "seeds": 1, "results": results})
    _plot(results)
    print(f"record: {rec}\nplot: {OUT / 'ddp_micro_batch.png'}")
    return 0


def _plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    bs = list(results)
    width = 0.8 / len(KINDS)
    for i, k in enumerate(KINDS):
        ax.bar([j + (i - (len(KINDS) - 1) / 2) * width for j in range(len(bs))],
               [100 * results[b][k]["test_acc"] for b in bs], width, label=k)
    ax.set_xticks(range(len(bs)), [f"{b} per rank ({WORLD * int(b)} global)" for b in bs])
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"digits, small ResNet, DDP on {WORLD} gloo ranks")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    OUT.mkdir(exist_ok=True)
    fig.savefig(OUT / "ddp_micro_batch.png", dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
