#!/usr/bin/env python3
"""``python tools/bench.py dist``: synchronized BatchNorm steps on gloo ranks (CPU): collectives, bytes, step time.

For a small ResNet under DistributedDataParallel on ``--world`` gloo ranks (default 2), at a few per-rank
batches, each configuration trains ``--steps`` steps per round, the configurations interleaved, for ``--pairs``
rounds:

- ``bn``: per-rank nn.BatchNorm (no synchronization);
- ``sync_exact``: fxbns exact statistics, ``Policy.set_sync()``;
- ``sync_fs`` / ``sync_fs_sb``: fxbns fs statistics (every layer sampled), synchronized, without and with
  ``sample_backward``.

The BatchNorm collectives are counted by wrapping ``torch.distributed``'s Python collectives in the workers
(calls and bytes each rank sends, per step; DDP's own gradient all-reduce and buffer broadcast run in C++ and
are not in the count).  They are compared with what ``nn.SyncBatchNorm`` issues, read from
``torch/nn/modules/_functions.py`` (one all_gather of 2C+1 values in forward, one all_reduce of 2C in backward
per layer: the source lines are printed).  ``nn.SyncBatchNorm`` itself refuses CPU tensors, so it is not run.

    python tools/bench.py dist --smoke                 # 1 round, 2 steps, batch 2, 16x16: checks it runs
    python tools/bench.py dist --batches 2,8,32        # the measurement (on an otherwise idle machine)

Step times are medians over rounds of the per-step mean; a figure from a loaded machine is not a measurement.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import socket
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))
warnings.filterwarnings("ignore", message="sample_backward is on")

CONFIGS = ["bn", "sync_exact", "sync_fs", "sync_fs_sb"]
_COLLECTIVES = ["all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce", "broadcast",
                "reduce_scatter_tensor"]


class Counter:
    """Wraps ``torch.distributed``'s collectives in this process: calls and bytes sent, per name."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.bytes: dict[str, int] = {}
        self.on = False
        for name in _COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is not None:
                setattr(dist, name, self._wrap(name, fn))

    def _wrap(self, name, fn):
        def wrapped(*args, **kwargs):
            if self.on:
                sent = _sent_tensor(name, args, kwargs)
                self.calls[name] = self.calls.get(name, 0) + 1
                self.bytes[name] = self.bytes.get(name, 0) + (sent.numel() * sent.element_size() if sent is not None
                                                              else 0)
            return fn(*args, **kwargs)
        return wrapped

    def reset(self) -> None:
        self.calls, self.bytes = {}, {}


def _sent_tensor(name: str, args, kwargs):
    """The tensor a rank contributes: the input of a gather (second argument), else the first."""
    if name in ("all_gather_single", "all_gather_into_tensor", "all_gather", "reduce_scatter_tensor"):
        t = args[1] if len(args) > 1 else kwargs.get("input_tensor", kwargs.get("tensor"))
    else:
        t = args[0] if args else kwargs.get("tensor")
    return t if isinstance(t, torch.Tensor) else None


def syncbn_collectives() -> dict:
    """What nn.SyncBatchNorm issues per layer and step, read from its source (torch/nn/modules/_functions.py)."""
    from torch.nn.modules import _functions as f

    src_file = inspect.getsourcefile(f.SyncBatchNorm)
    out: dict = {"file": os.path.relpath(src_file, Path(torch.__file__).parents[1]), "lines": {}}
    for phase in ("forward", "backward"):
        lines, start = inspect.getsourcelines(getattr(f.SyncBatchNorm, phase))
        hits = [(start + i, ln.strip()) for i, ln in enumerate(lines)
                if any(f"{c}(" in ln for c in ("all_gather", "all_gather_single", "all_reduce"))]
        out["lines"][phase] = [f"{n}: {t}" for n, t in hits]
    # per layer with C channels: forward gathers [mean, invstd, count] (2C + 1 values of the input's dtype) from
    # every rank (all_gather_single, or all_gather on gloo); backward all-reduces [sum_dy, sum_dy_xmu] (2C values)
    out["per_layer"] = {"forward": "1 all_gather of 2C+1 values", "backward": "1 all_reduce of 2C values"}
    return out


def _build(cfg: str, x: torch.Tensor):
    from _common import SmallResNet

    import fxbns

    torch.manual_seed(0)
    if cfg == "bn":
        return SmallResNet()
    policy = fxbns.Policy.from_preset("exact" if cfg == "sync_exact" else "fs").set_min_elements(0).set_sync()
    if cfg.endswith("_sb"):
        policy.set_sample_backward(True)
    return fxbns.transform(SmallResNet(), policy, example_inputs=x[:2])


def _worker(rank: int, port: int, args, queue) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        counter = Counter()
        gen = torch.Generator().manual_seed(rank)
        for b in args.batches:
            x = torch.randn(b, 3, args.size, args.size, generator=gen)
            y = torch.randint(0, 10, (b,), generator=gen)
            models = {}
            for cfg in args.configs:
                m = DDP(_build(cfg, x))
                models[cfg] = (m, torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9))

            def step(cfg, models=models, x=x, y=y):
                m, opt = models[cfg]
                loss = F.cross_entropy(m(x + 0.01 * torch.randn_like(x)), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            for cfg in args.configs:  # warm-up, then count one step's collectives
                for _ in range(2):
                    step(cfg)
            counts = {}
            for cfg in args.configs:
                counter.reset()
                counter.on = True
                step(cfg)
                counter.on = False
                counts[cfg] = {"calls": dict(counter.calls), "bytes_sent": dict(counter.bytes)}
            times: dict[str, list[float]] = {c: [] for c in args.configs}
            for _ in range(args.pairs):
                for cfg in args.configs:
                    dist.barrier()
                    t0 = time.perf_counter()
                    for _ in range(args.steps):
                        step(cfg)
                    times[cfg].append((time.perf_counter() - t0) / args.steps)
            if rank == 0:
                queue.put((b, counts, times))
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tools/bench.py dist", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="2,8,32", help="per-rank batches")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="steps per configuration and round")
    ap.add_argument("--pairs", type=int, default=5, help="rounds (the configurations interleaved in each)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--smoke", action="store_true", help="batch 2, 16x16, 1 round of 2 steps: checks that it runs")
    ap.add_argument("--out", help="JSON record path (default out/bench/dist-<time>.json, git-ignored)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.batches, args.size, args.steps, args.pairs = "2", 16, 2, 1
    args.batches = [int(v) for v in args.batches.split(",")]
    args.configs = args.configs.split(",")
    unknown = set(args.configs) - set(CONFIGS)
    if unknown:
        ap.error(f"unknown --configs {sorted(unknown)}; choose from {CONFIGS}")
    sbn = syncbn_collectives()
    from _common import SmallResNet
    channels = [m.num_features for m in SmallResNet().modules() if isinstance(m, torch.nn.BatchNorm2d)]
    n_layers, sum_c = len(channels), sum(channels)
    print(f"model: SmallResNet, {n_layers} BatchNorm layers, {sum_c} channels in all; {args.world} gloo ranks")
    print(f"nn.SyncBatchNorm ({sbn['file']}; the lines of a phase are alternative branches, one runs per layer):")
    for phase, lines in sbn["lines"].items():
        for ln in lines:
            print(f"  {phase}: line {ln}")
    print(f"  per step: {2 * n_layers} collectives ({n_layers} all_gather + {n_layers} all_reduce), "
          f"{4 * (2 * sum_c + n_layers) + 4 * 2 * sum_c} bytes sent per rank in float32")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    t0 = time.time()
    mp.spawn(_worker, args=(port, args, queue), nprocs=args.world)
    rows = []
    while not queue.empty():
        b, counts, times = queue.get()
        base = statistics.median(times["bn"]) if "bn" in times else None
        for cfg in args.configs:
            c = counts[cfg]
            ms = 1e3 * statistics.median(times[cfg])
            row = {"batch": b, "config": cfg, "collectives": sum(c["calls"].values()), "calls": c["calls"],
                   "bytes_sent": sum(c["bytes_sent"].values()), "ms_per_step": ms,
                   "ms_range": [1e3 * min(times[cfg]), 1e3 * max(times[cfg])],
                   "vs_bn": ms / (1e3 * base) if base else None}
            if "sync_exact" in times:  # the round-by-round ratio to exact sync (rounds interleave the configs)
                ratios = [t / e for t, e in zip(times[cfg], times["sync_exact"])]
                row["vs_sync_exact"] = statistics.median(ratios)
                row["vs_sync_exact_range"] = [min(ratios), max(ratios)]
            rows.append(row)
    print(f"\n{'batch':>5} {'config':12s} {'collectives':>11} {'bytes sent':>10} {'ms/step':>8} {'x bn':>6} "
          f"{'x sync_exact [range]':>22}" + ("   (smoke: times are not a measurement)" if args.smoke else ""))
    for r in rows:
        vs = f"{r['vs_bn']:.3f}" if r["vs_bn"] else "-"
        ve = "-"
        if "vs_sync_exact" in r:
            lo, hi = r["vs_sync_exact_range"]
            ve = f"{r['vs_sync_exact']:.3f} [{lo:.2f}-{hi:.2f}]"
        print(f"{r['batch']:5d} {r['config']:12s} {r['collectives']:11d} {r['bytes_sent']:10d} "
              f"{r['ms_per_step']:8.2f} {vs:>6} {ve:>22}  {r['calls']}")
    record = {"mode": "dist", "smoke": args.smoke, "world": args.world, "backend": "gloo", "size": args.size,
              "steps": args.steps, "pairs": args.pairs, "threads_per_rank": args.threads,
              "bn_layers": n_layers, "bn_channels": sum_c, "syncbatchnorm": sbn, "rows": rows,
              "command": " ".join(["python", "tools/bench.py", "dist", *(argv if argv is not None else sys.argv[2:])]),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__, "cores": os.cpu_count(),
              "seconds": round(time.time() - t0, 1)}
    out = Path(args.out) if args.out else ROOT / "out" / "bench" / f"dist-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nrecord: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
