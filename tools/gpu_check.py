#!/usr/bin/env python3
"""The GPU check: correctness of the CUDA path, per-layer speed at ResNet-50 batch-64 shapes, and whole training
steps, in one command (``bash scripts/gpu-check.sh``).  Prints a table and writes one JSON record.

Run with nothing but the repository on PYTHONPATH and a CUDA build of torch >= 2.5: no network, no installs.
``--smoke`` runs the same code on the CPU at tiny sizes (the test suite runs it, so the script cannot rot).

Per layer: for each BN shape of ResNet-50 at batch 64 (224x224 input), estimator (the bs and fs presets' samples,
every layer sampled), sample_backward off/on, fp32 and bf16 autocast, NCHW and channels-last: first the output and
gradients of the fxbns layer against the reference op (``fxbns.ops.reference``) on the same sample; then
forward+backward time against ``nn.BatchNorm2d`` (cuDNN), interleaved, rotating among 3 inputs (the L2 cache is
~60 MB), CUDA events, median of the per-pair ratios.  A row whose correctness check failed is reported as
"speed not checked".  End to end: a resnet50 and a mobilenet_v2 training step (SGD, bf16 autocast,
channels-last), eager and torch.compile, the fs preset against the original model.

Then the speed targets (``TARGETS``): per layer group (estimator, sample_backward, dtype, layout) the median
speedup over the shapes, and each resnet50 step.  They are reported, met or not, and do not change the exit
status, which says whether the code is correct.  For a missed target, ``torch.profiler`` records where the time
went: the top operators by device time (CPU time on the CPU) of the fxbns layer at the group's slowest shape, or of
both sides of the step.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import fxbns  # noqa: E402
from fxbns import BatchSampling, FeatureSampling, SampledBatchNorm  # noqa: E402
from fxbns.ops import sampled_batch_norm  # noqa: E402
from fxbns.sampling import build_groups  # noqa: E402

RESNET50_B64 = [(64, 64, 112, 112), (64, 64, 56, 56), (64, 256, 56, 56), (64, 128, 28, 28), (64, 512, 28, 28),
                (64, 256, 14, 14), (64, 1024, 14, 14), (64, 512, 7, 7), (64, 2048, 7, 7)]
SMOKE_SHAPES = [(4, 8, 16, 16), (8, 16, 8, 8)]
#: (what, threshold): per layer fwd+bwd with and without sample_backward (the memory-stream bounds are 1.6x and
#: 1.14x), a resnet50 bf16 training step, eager and compiled
TARGETS = {"layer, sample_backward": 1.5, "layer": 1.1, "resnet50 step": 1.10}
PROFILE_TOP = 10
SPECS = {"bs": BatchSampling(ratio=0.125, min_samples=2),
         "fs": FeatureSampling(area_ratio=1 / 16, layout="band", per_sample=True)}


class Timer:
    """Forward+backward wall time of a callable: CUDA events on CUDA, perf_counter (synchronised) elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            return a.elapsed_time(b)
        t = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t)


def _layer_correct(spec, shape, dtype, cl, device) -> tuple[bool, float]:
    """The fxbns layer's output and gradients against the reference op on the same sample (same draw)."""
    x = torch.randn(shape, device=device) * 2 + 0.5
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.to(dtype)
    w = torch.rand(shape[1], device=device) + 0.5
    b = torch.randn(shape[1], device=device)
    dy = torch.randn_like(x)
    groups = build_groups(spec, shape, shape[0], 0, torch.tensor(3, device=device), 11, host_step=3)
    out = []
    for path in ("reference", None):
        xx, ww, bb = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
        y = sampled_batch_norm(xx, ww, bb, groups, 1e-5, spec.sample_backward, path=path)
        y.backward(dy)
        out.append([y.detach().float(), xx.grad.float(), ww.grad, bb.grad])
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    err = max(float((a - e).abs().max() / (e.abs().max() + 1e-6)) for a, e in zip(out[1], out[0]))
    return err <= tol, err


def bench_layers(args, device) -> list[dict]:
    shapes = SMOKE_SHAPES if args.smoke else RESNET50_B64
    timer = Timer(device)
    rows = []
    dtypes = [torch.float32, torch.bfloat16]
    for shape in shapes:
        for name in SPECS:
            for sb in (False, True):
                spec = _spec(name, sb)
                for dtype in dtypes:
                    for cl in (False, True):
                        if dtype != torch.float32 and device.type == "cpu":
                            continue  # the CPU runs bf16 on the reference path: nothing to time there
                        ok, err = _layer_correct(spec, shape, dtype, cl, device)
                        row = {"shape": list(shape), "estimator": name, "sample_backward": sb,
                               "dtype": str(dtype).replace("torch.", ""), "layout": "channels_last" if cl else "nchw",
                               "correct": ok, "max_rel_err": err}
                        if ok:
                            row.update(_time_layer(spec, shape, dtype, cl, device, timer, args))
                        else:
                            row["speed"] = "not checked (correctness check failed)"
                        rows.append(row)
                        print(_fmt_layer(row), flush=True)
    return rows


def _spec(name: str, sample_backward: bool):
    """The estimator ``SPECS[name]`` with ``sample_backward`` set."""
    base = SPECS[name]
    return type(base)(**{**base.__dict__, "sample_backward": sample_backward})


def _layer_inputs(shape, dtype, cl, device, n: int):
    """``n`` inputs (each shifted a little, so none is constant) and output gradients of one layer."""
    fmt = torch.channels_last if cl else torch.contiguous_format
    xs = [(torch.randn(shape, device=device) + 0.1 * i).to(dtype).contiguous(memory_format=fmt).requires_grad_()
          for i in range(n)]
    dys = [torch.randn(shape, device=device).to(dtype).contiguous(memory_format=fmt) for _ in range(n)]
    return xs, dys


def _time_layer(spec, shape, dtype, cl, device, timer, args) -> dict:
    xs, dys = _layer_inputs(shape, dtype, cl, device, 3)
    native = nn.BatchNorm2d(shape[1]).to(device)
    sampled = SampledBatchNorm.from_batchnorm(copy.deepcopy(native), spec)

    def step(mod, i):
        return lambda: mod(xs[i % 3]).backward(dys[i % 3])

    for i in range(args.warmup):
        step(native, i)()
        step(sampled, i)()
    ratios, tn, ts = [], [], []
    for i in range(args.pairs):
        a = timer(step(native, i))
        b = timer(step(sampled, i))
        tn.append(a)
        ts.append(b)
        ratios.append(a / b)
    return {"native_ms": statistics.median(tn), "fxbns_ms": statistics.median(ts),
            "speedup": statistics.median(ratios), "spread": [min(ratios), max(ratios)],
            "runs": sampled.last_runs}


def _fmt_layer(r) -> str:
    head = (f"{'x'.join(map(str, r['shape'])):>16s} {r['estimator']:2s} {'sb' if r['sample_backward'] else '  '} "
            f"{r['dtype']:8s} {r['layout']:13s} err {r['max_rel_err']:.1e}")
    if not r["correct"]:
        return head + "  speed not checked (correctness check failed)"
    return (head + f"  native {r['native_ms']:8.3f} ms  fxbns {r['fxbns_ms']:8.3f} ms  {r['speedup']:.3f}x "
            f"[{r['spread'][0]:.2f}-{r['spread'][1]:.2f}] ({r['runs']})")


def bench_steps(args, device) -> list[dict]:
    import torchvision

    models = {"resnet18": (16, 32)} if args.smoke else {"resnet50": (64, 224), "mobilenet_v2": (64, 224)}
    modes = ["eager", "compiled"] if device.type == "cuda" or args.smoke_compile else ["eager"]
    timer = Timer(device)
    rows = []
    for name, (batch, size) in models.items():
        for mode in modes:
            base = getattr(torchvision.models, name)(num_classes=100).to(device).to(memory_format=torch.channels_last)
            x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
            t = torch.randint(0, 100, (batch,), device=device)
            pol = fxbns.Policy.from_preset("fs")
            if args.smoke:
                pol.set_min_elements(0)
            fx = fxbns.transform(copy.deepcopy(base), pol, example_inputs=x[:2]).to(memory_format=torch.channels_last)
            runs = {}
            for label, model in (("native", base), ("fxbns", fx)):
                model.train()
                opt = torch.optim.SGD(model.parameters(), lr=0.01)
                fn = torch.compile(model) if mode == "compiled" else model

                def step(fn=fn, opt=opt, x=x, t=t):
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                        loss = nn.functional.cross_entropy(fn(x), t)
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                runs[label] = step
            for _ in range(args.warmup):
                runs["native"]()
                runs["fxbns"]()
            ratios, tn, tf = [], [], []
            for _ in range(args.pairs):
                a = timer(runs["native"])
                b = timer(runs["fxbns"])
                tn.append(a)
                tf.append(b)
                ratios.append(a / b)
            sampled = sum(1 for m in fx.modules() if getattr(m, "last_runs", None) == "sampled")
            row = {"model": name, "mode": mode, "batch": batch, "size": size, "native_ms": statistics.median(tn),
                   "fxbns_ms": statistics.median(tf), "speedup": statistics.median(ratios),
                   "spread": [min(ratios), max(ratios)], "sampled_sites": sampled,
                   "_steps": runs}  # for the profiles of a missed target; not in the record
            rows.append(row)
            print(f"{name:13s} {mode:8s} b{batch} {size}px  native {row['native_ms']:8.2f} ms  fxbns "
                  f"{row['fxbns_ms']:8.2f} ms  {row['speedup']:.3f}x [{min(ratios):.2f}-{max(ratios):.2f}]  "
                  f"sampled sites {sampled}", flush=True)
    return rows


def _profile(fn, device, steps: int = 3) -> list[dict]:
    """The top operators of ``steps`` calls of ``fn`` by self device time (CPU time where there is no GPU)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    total = max(sum(getattr(e, key, 0.0) for e in events), 1e-9)
    rows = sorted(events, key=lambda e: getattr(e, key, 0.0), reverse=True)[:PROFILE_TOP]
    return [{"op": e.key, "calls": e.count, "self_us_per_call": getattr(e, key, 0.0) / max(e.count, 1),
             "share": getattr(e, key, 0.0) / total} for e in rows]


def check_targets(record: dict, device, args) -> list[dict]:
    """Each speed target, met or not; a missed one carries a profile of the fxbns side."""
    groups: dict[tuple, list[dict]] = {}
    for r in record["layers"]:
        if r["correct"]:
            groups.setdefault((r["estimator"], r["sample_backward"], r["dtype"], r["layout"]), []).append(r)
    out = []
    for (est, sb, dtype, layout), rows in groups.items():
        what = "layer, sample_backward" if sb else "layer"
        med = statistics.median(r["speedup"] for r in rows)
        t = {"target": what, "group": f"{est} {dtype} {layout}", "threshold": TARGETS[what], "speedup": med,
             "met": med >= TARGETS[what]}
        if not t["met"]:
            worst = min(rows, key=lambda r: r["speedup"])
            t["profiled_shape"] = worst["shape"]
            t["profile"] = _profile(_layer_step(_spec(est, sb), tuple(worst["shape"]), getattr(torch, dtype),
                                                layout == "channels_last", device), device)
        out.append(t)
    for r in record.get("steps", []):
        if r["model"] != "resnet50" and not args.smoke:
            continue
        t = {"target": "resnet50 step", "group": f"{r['model']} {r['mode']}", "threshold": TARGETS["resnet50 step"],
             "speedup": r["speedup"], "met": r["speedup"] >= TARGETS["resnet50 step"]}
        if not t["met"] and r.get("_steps") is not None:
            t["profile"] = _profile(r["_steps"]["fxbns"], device)
            t["profile_native"] = _profile(r["_steps"]["native"], device)
        out.append(t)
    for r in record.get("steps", []):
        r.pop("_steps", None)
    return out


def _layer_step(spec, shape, dtype, cl, device):
    (x,), (dy,) = _layer_inputs(shape, dtype, cl, device, 1)
    sampled = SampledBatchNorm.from_batchnorm(nn.BatchNorm2d(shape[1]).to(device), spec)
    return lambda: sampled(x).backward(dy)


def run_tests(args) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_ops.py"]
    # on the GPU: every cuda-marked test, the synchronized op on NCCL's one-rank group included
    cmd += ["-k", "launches or formula"] if args.smoke else ["tests/test_distributed.py", "-m", "cuda"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    tail = (p.stdout + p.stderr).strip().splitlines()[-1:] or [""]
    print(f"tests: {' '.join(cmd[3:])}: {tail[0]}", flush=True)
    return {"command": " ".join(cmd[3:]), "returncode": p.returncode, "summary": tail[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="the same code on the CPU at tiny sizes")
    ap.add_argument("--smoke-compile", action="store_true", help="with --smoke: also the compiled step")
    ap.add_argument("--pairs", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "out"))
    ap.add_argument("--skip-steps", action="store_true", help="layers only")
    args = ap.parse_args()
    args.pairs = args.pairs or (3 if args.smoke else 30)
    args.warmup = args.warmup or (1 if args.smoke else 5)
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU visible to torch (torch.cuda.is_available() is False); "
              "use --smoke to run the check on the CPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    record = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "smoke": args.smoke,
              "torch": torch.__version__, "python": platform.python_version(),
              "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"}
    print(f"gpu-check on {record['device']} (torch {torch.__version__})", flush=True)
    record["tests"] = run_tests(args)
    record["layers"] = bench_layers(args, device)
    if not args.skip_steps:
        record["steps"] = bench_steps(args, device)
    record["targets"] = check_targets(record, device, args)
    note = "  (smoke: CPU timings at tiny sizes, not a measurement)" if args.smoke else ""
    for t in record["targets"]:
        print(f"target {t['target']:24s} {t['group']:28s} {t['speedup']:.3f}x (>= {t['threshold']}x): "
              f"{'met' if t['met'] else 'NOT met'}{note}", flush=True)
        for p in t.get("profile", [])[:5]:
            print(f"    {p['op'][:48]:48s} {p['calls']:5d} calls  {p['self_us_per_call']:10.1f} us/call  "
                  f"{100 * p['share']:5.1f}%", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu-check-{'smoke-' if args.smoke else ''}{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=1))
    bad = [r for r in record["layers"] if not r["correct"]]
    print(f"record: {path}\ngpu-check: {'FAILED' if bad or record['tests']['returncode'] else 'OK'}"
          f" ({len(bad)} layer rows failed their correctness check)", flush=True)
    return 1 if bad or record["tests"]["returncode"] else 0


if __name__ == "__main__":
    sys.exit(main())
