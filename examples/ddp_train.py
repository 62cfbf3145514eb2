#!/usr/bin/env python3
"""Data-parallel training of a transformed model with DistributedDataParallel (torchrun).

Trains the small ResNet on scikit-learn's bundled digits, each rank on its own shard, with an fxbns policy
whose statistics are synchronized across the ranks (``Policy.set_sync``).  The backend is NCCL when GPUs are
present (one per rank), gloo on the CPU otherwise; the fxbns code is the same.

    torchrun --nproc-per-node 2 examples/ddp_train.py                     # fs, synchronized, 2 epochs
    torchrun --nproc-per-node 2 examples/ddp_train.py --policy exact      # synchronized exact statistics
    torchrun --nproc-per-node 2 examples/ddp_train.py --no-sync --batch 8 # per-rank sampled statistics
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import SmallResNet, evaluate, save_record  # noqa: E402

import fxbns  # noqa: E402
from fxbns.datasets import digits  # noqa: E402


def train_ddp(model: torch.nn.Module, data, *, epochs: int, batch: int, lr: float, seed: int,
              device: torch.device) -> torch.nn.Module:
    """SGD (momentum, one-cycle schedule) under DDP; ``batch`` per rank, every rank the same number of steps
    (the ranks' shards of one shared permutation per epoch).  Returns the DDP-wrapped model."""
    rank, world = dist.get_rank(), dist.get_world_size()
    xtr, ytr = data[0], data[1]
    model = model.to(device)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    steps_per_epoch = len(ytr) // (batch * world)
    opt = torch.optim.SGD(ddp.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                pct_start=0.15)
    g = torch.Generator().manual_seed(seed)  # the same on every rank: one permutation, sharded
    for _ in range(epochs):
        ddp.train()
        perm = torch.randperm(len(ytr), generator=g)[rank::world]
        shifts = torch.randint(-2, 3, (steps_per_epoch, 2), generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * batch:(i + 1) * batch]
            xb = torch.roll(xtr[idx], shifts=tuple(int(v) for v in shifts[i]), dims=(2, 3)).to(device)
            loss = F.cross_entropy(ddp(xb), ytr[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return ddp


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="fs", help="fxbns preset (exact, bs, fs, micro, ...)")
    ap.add_argument("--no-sync", action="store_true", help="per-rank statistics (no Policy.set_sync)")
    ap.add_argument("--batch", type=int, default=16, help="per-rank batch")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--size", type=int, default=32, help="image size")
    ap.add_argument("--record", default="ddp_train", help="name of the record rank 0 writes under examples/results "
                    "(default ddp_train)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        data = digits(size=args.size, seed=0)
        torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
        policy = fxbns.Policy.from_preset(args.policy).set_min_elements(0)
        if not args.no_sync:
            policy.set_sync()
        model = fxbns.transform(SmallResNet(), policy, example_inputs=data[0][:2])
        if rank == 0:
            print(fxbns.report(model))
            print(f"backend {dist.get_backend()}, {world} ranks, batch {args.batch} per rank", flush=True)
        t0 = time.time()
        ddp = train_ddp(model, data, epochs=args.epochs, batch=args.batch, lr=args.lr, seed=0, device=device)
        if rank == 0:
            acc, loss = evaluate(ddp.module, data[2].to(device), data[3].to(device))
            seconds = time.time() - t0
            print(f"test accuracy {100 * acc:.2f}% (loss {loss:.3f}) after {args.epochs} epochs, "
                  f"{seconds:.0f} s", flush=True)
            rec = save_record(args.record, {
                "command": f"torchrun --nproc-per-node {world} examples/ddp_train.py " + " ".join(sys.argv[1:]),
                "backend": dist.get_backend(), "ranks": world, "policy": args.policy, "sync": not args.no_sync,
                "batch_per_rank": args.batch, "epochs": args.epochs, "lr": args.lr, "size": args.size,
                "test_acc": acc, "test_loss": loss, "train_seconds": round(seconds, 1)})
            print(f"record: {rec}")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
