#!/usr/bin/env python3
"""Benchmarks: print a table and write a JSON record (out/bench/<mode>-<time>.json, git-ignored).

    python tools/bench.py layer   # nn.BatchNorm2d vs each estimator, per BN shape (fwd+bwd and fwd-only)
    python tools/bench.py train   # per-step training time, original vs transformed model
    python tools/bench.py train --presets fs --min-elements 524288 --baseline fs   # two policies head to head
    python tools/bench.py onnx    # onnxruntime latency, folded vs unfolded export
    python tools/bench.py transform  # how long fxbns.transform takes per model
    python tools/bench.py kernels    # the primitives of a BN layer on one shape (where the time goes)

Method (../shared/MEASURING.md): A and B interleaved in one process after warm-up; medians, the median of
the per-pair ratios and its min-max spread; never constant inputs.  ``--allocator tuned`` (default) runs with
glibc's allocator told to keep large blocks mapped (MALLOC_MMAP_THRESHOLD_ etc.), ``--allocator default``
without; the record says which.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# the benchmark times sample_backward on purpose; transform's warning about its gradients is for users training
warnings.filterwarnings("ignore", message="sample_backward is on")

TUNED = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736",
         "MALLOC_TOP_PAD_": "1073741824"}


def _ensure_allocator(mode: str) -> None:
    """Re-exec with the allocator environment the run asks for (it must be set before the process starts)."""
    want = TUNED if mode == "tuned" else {}
    have = {k: os.environ.get(k) for k in TUNED}
    if all(have[k] == want.get(k) for k in TUNED):
        return
    env = {k: v for k, v in os.environ.items() if k not in TUNED}
    env.update(want)
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def _machine() -> dict:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
            platform.machine(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(),
            "allocator": "tuned glibc (" + ", ".join(f"{k}={v}" for k, v in TUNED.items()) + ")"
            if os.environ.get("MALLOC_MMAP_THRESHOLD_") == TUNED["MALLOC_MMAP_THRESHOLD_"] else "glibc default"}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _timeit(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def ab(fa, fb, device, pairs: int, warmup: int = 3) -> dict:
    """Interleaved A/B timing: medians, median per-pair ratio A/B (>1: B faster), min-max of the ratios."""
    for _ in range(warmup):
        fa()
        fb()
    ta, tb, ratios = [], [], []
    for i in range(pairs):
        if i % 2 == 0:
            a = _timeit(fa, device)
            b = _timeit(fb, device)
        else:
            b = _timeit(fb, device)
            a = _timeit(fa, device)
        ta.append(a)
        tb.append(b)
        ratios.append(a / b)
    return {"a_ms": 1e3 * statistics.median(ta), "b_ms": 1e3 * statistics.median(tb),
            "speedup": statistics.median(ratios), "spread": [min(ratios), max(ratios)]}


def _geomean(v):
    return math.exp(sum(math.log(x) for x in v) / len(v)) if v else float("nan")


def _write(mode: str, record: dict, out: str | None) -> str:
    folder = ROOT / "out" / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    path = out or str(folder / f"{mode}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=2)
    os.replace(path + ".tmp", path)
    return path


# --------------------------------------------------------------------------------------------- layer
RESNET50_B64 = [(64, 64, 56, 56), (64, 256, 56, 56), (64, 128, 28, 28), (64, 512, 28, 28),
                (64, 256, 14, 14), (64, 1024, 14, 14), (64, 512, 7, 7), (64, 2048, 7, 7)]
CIFAR_B128 = [(128, 16, 32, 32), (128, 32, 16, 16), (128, 64, 8, 8)]


def layer_estimators(names: list[str]):
    from fxbns import BatchSampling, FeatureSampling

    table = {
        "bs": BatchSampling(ratio=1 / 8),
        "bs_sb": BatchSampling(ratio=1 / 8, sample_backward=True),
        "bs_random": BatchSampling(ratio=1 / 8, draw="random"),
        "fs": FeatureSampling(area_ratio=1 / 16, layout="band", per_sample=True),
        "fs_sb": FeatureSampling(area_ratio=1 / 16, layout="band", per_sample=True, sample_backward=True),
        "fs_grid": FeatureSampling(area_ratio=1 / 16, layout="grid", per_sample=True),
        "fs_grid_sb": FeatureSampling(area_ratio=1 / 16, layout="grid", per_sample=True, sample_backward=True),
        "fs_patch": FeatureSampling(area_ratio=1 / 16),
        "fs_patch_sb": FeatureSampling(area_ratio=1 / 16, sample_backward=True),
    }
    return {n: table[n] for n in names}


def bench_layer(args) -> dict:
    import torch
    from torch import nn

    from fxbns import SampledBatchNorm

    device = torch.device(args.device)
    counts = {}
    if args.shapes == "paper":
        shapes = [("resnet50-b64", s) for s in RESNET50_B64] + [("cifar-resnet-b128", s) for s in CIFAR_B128]
    else:  # the BN input shapes of a torchvision model in a training step, each once, with how often it occurs
        shapes, counts = _model_bn_shapes(args.shapes)
    if args.quick:
        shapes = [shapes[1], shapes[3], shapes[5], shapes[8]]
    ests = layer_estimators(args.estimators.split(","))
    rows = []
    print(f"{'shape':24s} {'est':12s} {'native fb ms':>12s} {'ours fb ms':>10s} {'fb x':>6s} {'spread':>12s} "
          f"{'native f ms':>11s} {'ours f ms':>9s} {'f x':>6s}")
    for tag, shape in shapes:
        torch.manual_seed(0)
        x = (torch.randn(shape, device=device) * 2 + 0.5).requires_grad_()
        dy = torch.randn(shape, device=device)
        bn = nn.BatchNorm2d(shape[1]).to(device)

        def run_fb(m, x=x, dy=dy):
            def f():
                y = m(x)
                y.backward(dy)
                x.grad = None
            return f

        def run_f(m, x=x):
            def f():
                with torch.no_grad():
                    m(x)
            return f

        for name, spec in ests.items():
            sbn = SampledBatchNorm.from_batchnorm(copy.deepcopy(bn), spec)
            fb = ab(run_fb(bn), run_fb(sbn), device, args.pairs)
            fo = ab(run_f(bn), run_f(sbn), device, args.pairs)
            row = {"set": tag, "shape": list(shape), "estimator": name, "spec": spec.describe(),
                   "fwd_bwd": fb, "fwd": fo}
            rows.append(row)
            print(f"{tag[:9] + ' ' + 'x'.join(map(str, shape)):24s} {name:12s} {fb['a_ms']:12.2f} {fb['b_ms']:10.2f} "
                  f"{fb['speedup']:6.2f} {fb['spread'][0]:5.2f}-{fb['spread'][1]:<5.2f} {fo['a_ms']:11.2f} "
                  f"{fo['b_ms']:9.2f} {fo['speedup']:6.2f}", flush=True)
    summary = {}
    for name in ests:
        r = [x for x in rows if x["estimator"] == name]
        summary[name] = {"fwd_bwd_geomean": _geomean([x["fwd_bwd"]["speedup"] for x in r]),
                         "fwd_geomean": _geomean([x["fwd"]["speedup"] for x in r])}
        if counts:  # a model's BN layers: total time per training step, every layer counted as often as it occurs
            n = [counts[tuple(x["shape"])] for x in r]
            summary[name]["step_native_fwd_bwd_ms"] = sum(c * x["fwd_bwd"]["a_ms"] for c, x in zip(n, r))
            summary[name]["step_fxbns_fwd_bwd_ms"] = sum(c * x["fwd_bwd"]["b_ms"] for c, x in zip(n, r))
    print("\ngeometric-mean speedup over the shapes (native time / fxbns time):")
    for name, s in summary.items():
        tot = (f"   all {sum(counts.values())} BN layers of a step: native {s['step_native_fwd_bwd_ms']:.1f} ms, "
               f"fxbns {s['step_fxbns_fwd_bwd_ms']:.1f} ms fwd+bwd") if counts else ""
        print(f"  {name:12s} fwd+bwd {s['fwd_bwd_geomean']:.2f}x   fwd-only {s['fwd_geomean']:.2f}x{tot}")
    return {"mode": "layer", "shapes": args.shapes, "rows": rows, "summary": summary,
            "counts": [[list(k), v] for k, v in counts.items()]}


def _model_bn_shapes(arch: str):
    """The input shapes of every BatchNorm2d of a torchvision model at its train-bench batch and size."""
    import torch
    import torchvision

    _, batch, size = TRAIN_MODELS[arch]
    m = torchvision.models.get_model(arch, weights=None, num_classes=100)
    seen: dict = {}
    hooks = [mod.register_forward_hook(lambda mod, i, o: seen.__setitem__(tuple(i[0].shape),
                                                                           seen.get(tuple(i[0].shape), 0) + 1))
             for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        m(torch.randn(batch, 3, size, size))
    for h in hooks:
        h.remove()
    return [(f"{arch}-b{batch}", s) for s in seen], seen


# --------------------------------------------------------------------------------------------- train
TRAIN_MODELS = {
    "resnet18": ("resnet18", 64, 32),
    "resnet50": ("resnet50", 16, 64),
    "mobilenet_v2": ("mobilenet_v2", 32, 64),
    "densenet121": ("densenet121", 16, 64),
    "efficientnet_b0": ("efficientnet_b0", 16, 96),
}


def _bn_share(model, x, y) -> float:
    """Share of a training step's self CPU time spent in batch-norm ops (torch.profiler)."""
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(2):
            F.cross_entropy(model(x), y).backward()
    total = bn = 0.0
    for e in prof.key_averages():
        if e.key.startswith("ProfilerStep"):
            continue
        t = e.self_cpu_time_total if not x.is_cuda else getattr(e, "self_device_time_total", 0)
        total += t
        if "batch_norm" in e.key:
            bn += t
    return bn / total if total else float("nan")


def _exact_at_size(gm, batch: int, device_type: str, eager: bool = True) -> int:
    """Sampled-estimator sites that take exact statistics at this batch: below ``min_elements``, and in eager
    CPU training also the maps of 2-4 elements (``modules.exact_in_eager``)."""
    import fxbns
    from fxbns.modules import exact_in_eager, exact_reason

    def exact(spec, shape) -> bool:
        return exact_in_eager(spec, shape, device_type) if eager else exact_reason(spec, shape, device_type) is not None

    return sum(1 for r in fxbns.report(gm) if r["spec"] is not None and r["shape"] is not None
               and exact(r["spec"], (batch, *r["shape"][1:])))


def bench_train(args) -> dict:
    import torch
    import torch.nn.functional as F
    import torchvision

    import fxbns
    from fxbns import Policy

    device = torch.device(args.device)
    names = args.models.split(",")
    def preset_policy(p: str, min_elements: int | None):
        pol = Policy.from_preset(p.split("_")[0].split("+")[0])
        if p.removesuffix("+tune").endswith("_sb"):
            pol.set_sample_backward()
        if min_elements is not None:
            pol.set_min_elements(min_elements)
        return pol

    # "aa": the A side against a copy of itself (the A/A control: the noise floor of a ratio)
    policies = {p: None if p == "aa" else preset_policy(p, args.min_elements) for p in args.presets.split(",")}
    # the A side: native, or with --baseline the model transformed by that preset (two policies head to head)
    if args.baseline and ("+tune" in args.baseline or args.baseline == "aa"):
        raise SystemExit("bench.py train: --baseline takes a preset (bs, fs, bs_sb, fs_sb, ...), not aa or +tune")
    base_pol = preset_policy(args.baseline, args.baseline_min_elements) if args.baseline else None
    rows = []
    for name in names:
        arch, batch, size = TRAIN_MODELS[name]
        if args.batch:
            batch = args.batch
        if args.size:
            size = args.size
        torch.manual_seed(0)
        base = torchvision.models.get_model(arch, weights=None, num_classes=100).to(device)
        x = torch.randn(batch, 3, size, size, device=device)
        y = torch.randint(0, 100, (batch,), device=device)
        share = _bn_share(base, x, y)
        tune_cache: dict = {}
        for mode in args.modes.split(","):
            for pname, pol in policies.items():
                orig = copy.deepcopy(base) if base_pol is None else fxbns.transform(copy.deepcopy(base), base_pol,
                                                                                    example_inputs=x[:2])
                tuned = None
                if pname.endswith("+tune"):  # per-layer choice timed in this model's steps (fxbns.tune)
                    if pname not in tune_cache:  # once per model: tune times eager steps, whatever the mode
                        t0 = time.perf_counter()
                        res = fxbns.tune(copy.deepcopy(base), pol, x,
                                         loss_fn=lambda out, y=y: F.cross_entropy(out, y))
                        tune_cache[pname] = ({"seconds": round(time.perf_counter() - t0, 1), "timed": len(res.rows),
                                              "set_exact": res.exact}, res.policy)
                    tuned, pol = tune_cache[pname]
                gm = copy.deepcopy(orig) if pol is None else fxbns.transform(copy.deepcopy(base), pol,
                                                                                example_inputs=x[:2])
                ma, mb = (orig, gm) if mode == "eager" else (torch.compile(orig), torch.compile(gm))
                oa = torch.optim.SGD(orig.parameters(), lr=1e-3, momentum=0.9)
                ob = torch.optim.SGD(gm.parameters(), lr=1e-3, momentum=0.9)

                def step(m, opt, x=x, y=y):
                    def f():
                        opt.zero_grad(set_to_none=True)
                        F.cross_entropy(m(x), y).backward()
                        opt.step()
                    return f

                r = ab(step(ma, oa), step(mb, ob), device, args.pairs, warmup=3 if mode == "eager" else 5)
                mem = {}
                if mode == "eager" and device.type == "cpu" and not args.no_memory:
                    a_b, b_b = _peak_memory(orig, oa, step(ma, oa)), _peak_memory(gm, ob, step(mb, ob))
                    mem = {"native_peak_bytes": a_b, "fxbns_peak_bytes": b_b, "mem_ratio": b_b / a_b}
                elif device.type == "cuda":
                    mem = _cuda_peak(step(ma, oa), step(mb, ob))
                layer_x = args.layer_speedup
                bound = 1 / (1 - share * (1 - 1 / layer_x)) if layer_x else None
                row = {"model": name, "batch": batch, "size": size, "mode": mode, "preset": pname,
                       "baseline": "native" if base_pol is None else
                       {"preset": args.baseline, "min_elements": base_pol.default.min_elements},
                       "min_elements": pol.default.min_elements if pol is not None else None,
                       "exact_at_size": _exact_at_size(gm, batch, device.type, mode == "eager")
                       if pol is not None else None,
                       "native_ms": r["a_ms"], "fxbns_ms": r["b_ms"], "speedup": r["speedup"], "spread": r["spread"],
                       "bn_share": share, "bound_at_layer_speedup": [layer_x, bound], **mem,
                       **({"tune": tuned} if tuned else {})}
                rows.append(row)
                b = f"{bound:.3f}" if bound else "-"
                mr = f"{mem['mem_ratio']:.3f}x" if mem else "-"
                side_a = "native" if base_pol is None else args.baseline
                print(f"{name:16s} {batch}x3x{size}x{size} {mode:7s} {pname:7s} {side_a} {r['a_ms']:8.1f} ms  fxbns "
                      f"{r['b_ms']:8.1f} ms  {r['speedup']:.3f}x [{r['spread'][0]:.2f}-{r['spread'][1]:.2f}]  "
                      f"BN share {100 * share:4.1f}%  bound {b}  peak mem {mr}  exact BNs {row['exact_at_size']}", flush=True)
    return {"mode": "train", "rows": rows}


def _peak_memory(model, opt, step) -> int:
    """Peak bytes of live tensors during one training step (torch.distributed._tools.mem_tracker.MemTracker:
    it tracks every tensor storage through a dispatch mode, so it counts tensors, not allocator caches)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    mt = MemTracker()
    mt.track_external(model, opt)
    with mt:
        step()
    return int(sum(v.get("Total", 0) for v in mt.get_tracker_snapshot("peak").values()))


def _cuda_peak(fa, fb) -> dict:
    import torch

    def peak(fn):
        torch.cuda.reset_peak_memory_stats()
        fn()
        return torch.cuda.max_memory_allocated()

    a, b = peak(fa), peak(fb)
    return {"native_peak_bytes": a, "fxbns_peak_bytes": b, "mem_ratio": b / a}


# --------------------------------------------------------------------------------------------- onnx
def bench_onnx(args) -> dict:
    import tempfile

    import numpy as np
    import onnxruntime as ort
    import torch
    import torchvision

    import fxbns

    rows = []
    folder = tempfile.mkdtemp(prefix="fxbns-bench-")
    for name in args.models.split(","):
        arch, _, size = TRAIN_MODELS[name]
        torch.manual_seed(0)
        model = torchvision.models.get_model(arch, weights=None, num_classes=100).eval()
        gm = fxbns.transform(model, "fs")
        gm.eval()
        x = torch.randn(2, 3, size, size)
        paths = {}
        for fold in (False, True):
            r = fxbns.export_onnx(gm, x, os.path.join(folder, f"{name}-{fold}.onnx"), fold=fold)
            paths[fold] = (r.path, r.onnx_nodes)
        sess = {f: ort.InferenceSession(p, providers=fxbns.export.ort_providers()) for f, (p, _) in paths.items()}
        for batch in (1, 32):
            xb = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)

            def runner(s, xb=xb):
                return lambda: s.run(None, {s.get_inputs()[0].name: xb})

            r = ab(runner(sess[False]), runner(sess[True]), torch.device("cpu"), args.pairs, warmup=5)
            rows.append({"model": name, "size": size, "batch": batch, "unfolded_ms": r["a_ms"], "folded_ms": r["b_ms"],
                         "speedup": r["speedup"], "spread": r["spread"], "nodes_unfolded": paths[False][1],
                         "nodes_folded": paths[True][1]})
            print(f"{name:16s} batch {batch:3d} {size}x{size}  unfolded {r['a_ms']:8.2f} ms ({paths[False][1]} nodes)  "
                  f"folded {r['b_ms']:8.2f} ms ({paths[True][1]} nodes)  {r['speedup']:.3f}x "
                  f"[{r['spread'][0]:.2f}-{r['spread'][1]:.2f}]", flush=True)
    return {"mode": "onnx", "rows": rows, "providers": fxbns.export.ort_providers()}


# --------------------------------------------------------------------------------------------- transform
def bench_transform(args) -> dict:
    """Wall time of fxbns.transform (trace + match + plan + rewrite) per model: median of --pairs runs."""
    import torch
    import torchvision

    import fxbns

    rows = []
    for name in args.models.split(","):
        arch, _, size = TRAIN_MODELS[name]
        model = torchvision.models.get_model(arch, weights=None, num_classes=100)
        times = {}
        for with_shapes in (False, True):
            x = torch.randn(2, 3, size, size) if with_shapes else None
            ts = []
            for _ in range(max(3, args.pairs)):
                t0 = time.perf_counter()
                fxbns.transform(model, "fs", example_inputs=x)
                ts.append(time.perf_counter() - t0)
            times[with_shapes] = statistics.median(ts)
        rows.append({"model": name, "transform_s": times[False], "transform_with_example_inputs_s": times[True]})
        print(f"{name:16s} transform {times[False]:.3f} s   with example_inputs (shape capture) {times[True]:.3f} s",
              flush=True)
    return {"mode": "transform", "rows": rows}


# --------------------------------------------------------------------------------------------- kernels
def bench_kernels(args) -> dict:
    """The primitives a BN layer is made of, on one shape: where the time of native and sampled BN goes."""
    import torch
    import torch.nn.functional as F

    from fxbns import BatchSampling, FeatureSampling
    from fxbns.ops.cpu import _update_stats
    from fxbns.sampling import build_groups, gather, scatter_add_

    shape = tuple(int(v) for v in args.shape.split("x"))
    C = shape[1]
    torch.manual_seed(0)
    x, dy = torch.randn(shape), torch.randn(shape)
    w, m, v = torch.rand(C), torch.zeros(C), torch.ones(C)
    step = torch.tensor(3)
    bs = build_groups(BatchSampling(ratio=1 / 8), shape, shape[0], 0, step, 1)[0]
    grid = build_groups(FeatureSampling(area_ratio=1 / 16, layout="grid", per_sample=True), shape, shape[0], 0, step,
                        1)[0]
    band = build_groups(FeatureSampling(area_ratio=1 / 16, layout="band", per_sample=True), shape, shape[0], 0, step,
                        1, host_step=3)[0]
    xs_bs, xs_grid, xs_band = gather(x, bs), gather(x, grid), gather(x, band)
    dys_band = gather(dy, band)
    dx_buf = torch.randn(shape)
    d = [0, 2, 3]
    bcast = (1, C, 1, 1)
    ops = {
        "native BN forward (training)": lambda: F.batch_norm(x, m.clone(), v.clone(), w, None, True),
        "native BN backward (training)": lambda: torch.ops.aten.native_batch_norm_backward(
            dy, x, w, None, None, m, v, True, 1e-5, [True, True, True]),
        "eval-mode BN forward (one normalise pass)": lambda: F.batch_norm(x, m, v, w, None, False),
        "eval-mode BN backward (dx and both sums)": lambda: torch.ops.aten.native_batch_norm_backward(
            dy, x, w, m, v, None, None, False, 1e-5, [True, True, True]),
        "dy * scale (sample_backward dx)": lambda: dy * w.view(1, -1, 1, 1),
        "gather BS sample (1/8, whole rows)": lambda: gather(x, bs),
        "gather FS sample (1/16, grid, per-sample)": lambda: gather(x, grid),
        "scatter FS grid statistics term into dx": lambda: scatter_add_(dx_buf, grid, xs_grid),
        "FS band stats (view, batch_norm_update_stats)": lambda: torch.batch_norm_update_stats(xs_band, None, None, 0.),
        "FS band sums of dy (view, sample_backward)": lambda: torch.ops.aten.native_batch_norm_backward(
            dys_band, xs_band, w, m, v, None, None, False, 1e-5, [False, True, True]),
        "FS band statistics term, in place on the view": lambda: (
            gather(dx_buf, band).addcmul_(xs_band, w.view(bcast)).add_(m.view(bcast))),
        "sum over (N,H,W) of the BS sample": lambda: xs_bs.sum(d),
        "var_mean over (N,H,W) of the BS sample": lambda: torch.var_mean(xs_bs, d, correction=0),
        "BS sample stats: batch_norm_update_stats": lambda: torch.batch_norm_update_stats(xs_bs, None, None, 0.),
        "BS sample stats: sum + squared deviations": lambda: _update_stats(xs_bs, None, None, 0.),
        "BS sample stats: channels-last copy + stats": lambda: torch.batch_norm_update_stats(
            xs_bs.contiguous(memory_format=torch.channels_last), None, None, 0.),
    }
    rows = []
    for name, fn in ops.items():
        for _ in range(3):
            fn()
        ts = []
        for _ in range(max(5, args.pairs)):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        rows.append({"op": name, "ms": 1e3 * statistics.median(ts)})
        print(f"{name:45s} {rows[-1]['ms']:8.2f} ms", flush=True)
    return {"mode": "kernels", "shape": list(shape), "rows": rows}


def main() -> int:
    if sys.argv[1:2] == ["dist"]:  # synchronized BatchNorm on gloo ranks: tools/bench_dist.py
        _ensure_allocator("tuned")
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_dist import main as bench_dist
        return bench_dist(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["layer", "train", "onnx", "transform", "kernels"])
    ap.add_argument("--device", default="cuda" if os.environ.get("FXBNS_BENCH_CUDA") else "cpu")
    ap.add_argument("--pairs", type=int, default=10, help="interleaved A/B pairs (default 10)")
    ap.add_argument("--allocator", choices=["tuned", "default"], default="tuned")
    ap.add_argument("--out", help="JSON record path (default out/bench/<mode>-<time>.json, git-ignored)")
    ap.add_argument("--quick", action="store_true", help="layer: 4 shapes only")
    ap.add_argument("--shapes", default="paper", help="layer: 'paper' (ResNet-50 b64 and CIFAR ResNet b128 BN "
                    "shapes) or a train-bench model name (its BN shapes, and the per-step total)")
    ap.add_argument("--estimators", default="bs,bs_sb,fs,fs_sb", help="layer: comma-separated")
    ap.add_argument("--models", default="resnet18,resnet50,mobilenet_v2,densenet121,efficientnet_b0")
    ap.add_argument("--presets", default="bs,bs_sb,fs,fs_sb", help="train: presets, _sb = sample_backward on, "
                    "+tune = the per-layer choice of fxbns.tune (timed in the model's steps first), aa = native against a "
                    "copy of itself (the A/A control: how far a ratio moves by noise alone)")
    ap.add_argument("--modes", default="eager,compile", help="train: eager and/or compile")
    ap.add_argument("--batch", type=int, help="train: batch size for every model (default: per model)")
    ap.add_argument("--size", type=int, help="train: input size for every model (default: per model)")
    ap.add_argument("--layer-speedup", type=float, default=2.0,
                    help="train: per-layer speedup used for the upper bound (default 2.0, the pass-count limit)")
    ap.add_argument("--shape", default="64x512x28x28", help="kernels: the BN input shape")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--min-elements", type=int, default=None,
                    help="train: override the presets' min_elements (layers smaller than this keep exact "
                         "statistics; 0 samples every layer)")
    ap.add_argument("--no-memory", action="store_true", help="train: skip the peak-memory subprocess runs")
    ap.add_argument("--baseline", help="train: time the presets against the model transformed by this preset "
                    "(e.g. fs), not against native: two policies head to head ('aa' is then that model against a "
                    "copy of itself)")
    ap.add_argument("--baseline-min-elements", type=int, default=None,
                    help="train: the baseline preset's min_elements (default: the preset's own)")
    args = ap.parse_args()
    _ensure_allocator(args.allocator)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mode == "onnx" and args.models == ap.get_default("models"):
        args.models = "resnet18,mobilenet_v2"
    t0 = time.time()
    record = {"layer": bench_layer, "train": bench_train, "onnx": bench_onnx, "transform": bench_transform,
              "kernels": bench_kernels}[args.mode](args)
    record.update({"machine": _machine(), "command": " ".join(["python", "tools/bench.py", *sys.argv[1:]]),
                   "date": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": round(time.time() - t0, 1)})
    print(f"\nrecord: {_write(args.mode, record, args.out)} ({record['machine']['allocator']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
