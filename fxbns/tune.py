"""``tune``: keep each sampled BatchNorm only where it is faster *in the model*, measured on this machine.

The presets choose exact or sampled statistics per layer by size alone (``min_elements``).  Whether a
sampled layer pays off also depends on what the layer bench cannot see: the caches the neighbouring
layers leave behind, the map size, the autograd overhead of the model's own backward.  :func:`tune`
times every sampled site's forward and backward inside real training steps of (a copy of) the
transformed model, once with the site's estimator and once exact, interleaved, and returns a policy in
which the sites where exact statistics were faster are set exact by name::

    result = fxbns.tune(model, "fs", example_inputs=x)   # x: a real-size training batch
    print(result)                                         # per-site times and the choice
    gm = fxbns.transform(model, result.policy)            # save/load keep the choice (it is in the policy)

It is a setup step like ``torch.backends.cudnn.benchmark``: run it on the machine, batch size and input
size you train with.  The model passed in is not changed (the timing runs on a copy; RNG state restored).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .estimators import BatchSampling, Exact, FeatureSampling
from .modules import SampledBatchNorm, exact_in_eager
from .policy import Policy, resolve_policy

__all__ = ["tune", "TuneResult"]


@dataclass
class TuneResult:
    """What :func:`tune` measured: ``policy`` (the input policy with the slower sites set exact by name) and one
    row per timed site (median forward+backward milliseconds per step, sampled and exact, and the choice)."""

    policy: Policy
    rows: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0

    @property
    def exact(self) -> list[str]:
        """Names of the sites set exact."""
        return [r["name"] for r in self.rows if r["choice"] == "exact"]

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy.to_dict(), "steps": self.steps, "sites": [dict(r) for r in self.rows]}

    def __str__(self) -> str:
        w = max([len("name")] + [len(r["name"]) for r in self.rows])
        lines = [f"{'name':{w}s}  {'shape':16s}  {'sampled fwd+bwd ms':>22s}  {'exact fwd+bwd ms':>22s}  choice"]
        for r in self.rows:
            lines.append(f"{r['name']:{w}s}  {'x'.join(map(str, r['shape'])):16s}  "
                         f"{r['sampled_fwd_ms']:6.3f} + {r['sampled_bwd_ms']:6.3f} = {r['sampled_ms']:6.3f}  "
                         f"{r['exact_fwd_ms']:6.3f} + {r['exact_bwd_ms']:6.3f} = {r['exact_ms']:6.3f}  {r['choice']}")
        saved = sum(r["exact_ms"] - r["sampled_ms"] for r in self.rows if r["choice"] == "sampled")
        lines.append(f"{len(self.rows)} sampled sites timed over {self.steps} step pairs: {len(self.exact)} set exact; "
                     f"the sites kept sampled save {saved:.2f} ms per step")
        return "\n".join(lines)


def _grad_tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() and out.requires_grad else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _grad_tensors(o)]
    return []


def _default_loss(out: Any) -> torch.Tensor:
    """A scalar from any output structure (tensor, tuple, list, dict): the sum of the means of its floating-point
    tensors that require grad."""
    parts = _grad_tensors(out)
    if not parts:
        raise ValueError("fxbns.tune: the model's output has no floating-point tensor that requires grad; pass "
                         "loss_fn=... (a function of the output returning the scalar to call backward on)")
    return sum(p.float().mean() for p in parts)


def _sync(t: torch.Tensor) -> None:
    # timing only (a setup step, not the training path): wait for queued device work
    if t.device.type != "cpu" and t.device.type != "meta":
        acc = getattr(torch, "accelerator", None)
        if acc is not None and hasattr(acc, "synchronize"):
            acc.synchronize()
        elif t.is_cuda:
            torch.cuda.synchronize()


class _Timer:
    """Forward and backward time of one module: module hooks for the forward; for the backward, from the first
    autograd node of its output to the last node of the chain it created (the nodes between the output's node
    and the input's, e.g. a layout copy around the batch-norm node)."""

    def __init__(self, module: nn.Module, probe: torch.Tensor) -> None:
        self.fwd = 0.0
        self._t = 0.0
        self._calls: list[list[float]] = []  # per call: [backward start, backward end]
        self._probe = probe
        self.handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _pre(self, mod, args):
        _sync(self._probe)
        self._t = time.perf_counter()

    def _post(self, mod, args, out):
        _sync(self._probe)
        self.fwd += time.perf_counter() - self._t
        head = out.grad_fn if isinstance(out, torch.Tensor) else None
        if head is None:
            return
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        stop = x.grad_fn if x is not None else None
        rec = [0.0, 0.0]
        self._calls.append(rec)

        def start(grad_outputs):
            _sync(self._probe)
            rec[0] = time.perf_counter()

        def end(grad_inputs, grad_outputs):
            _sync(self._probe)
            rec[1] = time.perf_counter()

        head.register_prehook(start)
        seen, todo = set(), [head]
        while todo and len(seen) < 64:  # the module's own nodes: a handful
            node = todo.pop()
            if node is None or node is stop or id(node) in seen or type(node).__name__ == "AccumulateGrad":
                continue
            seen.add(id(node))
            node.register_hook(end)  # run in order: the last one to finish sets the end
            todo.extend(f for f, _ in node.next_functions)

    def take(self) -> tuple[float, float]:
        t = (self.fwd, sum(max(0.0, e - s) for s, e in self._calls))
        self.fwd = 0.0
        self._calls = []
        return t

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _sites(gm: nn.Module, names: set[str], shapes: dict[str, tuple[int, ...]], device: torch.device
           ) -> dict[str, nn.Module]:
    """The sites of ``gm`` that sample at the example batch: a BS or FS estimator, and not exact at that size."""
    out = {}
    for name, m in gm.named_modules():
        if name not in names or not isinstance(m, SampledBatchNorm) or m._vstate is not None:
            continue
        shape = shapes.get(name)
        spec = m.active_estimator(shape[0]) if shape else None
        if isinstance(spec, (BatchSampling, FeatureSampling)) and not exact_in_eager(
                spec, shape, device.type):
            out[name] = m
    return out


def _ms(times, part: int | None = None) -> float:
    """Median milliseconds of ``(fwd, bwd)`` pairs: their sum, or one ``part`` (0 fwd, 1 bwd)."""
    return round(1e3 * statistics.median(sum(t) if part is None else t[part] for t in times), 4)


def _copy(pol: Policy) -> Policy:
    """A copy of ``pol`` whose rule tables can be changed without touching ``pol`` (specs are immutable)."""
    out = copy.copy(pol)
    out.object_types, out.name_regexes, out.names = list(pol.object_types), list(pol.name_regexes), dict(pol.names)
    return out


def tune(model: nn.Module, policy: Any = "fs", example_inputs=None, *, loss_fn: Callable[[Any], torch.Tensor]
         | None = None, steps: int = 10, warmup: int = 2, leaf_modules=(), concrete_args=None) -> TuneResult:
    """Time every sampled BatchNorm of ``fxbns.transform(model, policy)`` inside training steps on
    ``example_inputs`` (a real-size batch: the choice depends on the shapes), with its estimator and exact,
    and return the policy with the sites where exact statistics were faster set exact by name.

    ``steps`` pairs of training steps (forward and backward; no optimizer step) are interleaved, sampled then
    exact, after ``warmup`` pairs; a site stays sampled when the median of its per-pair differences (sampled
    minus exact, forward plus backward) is negative.  ``loss_fn(output)`` gives the scalar to differentiate
    (default: the mean of the output).  ``model`` is not changed; the global RNG state is restored.
    Timed: BatchNorm modules whose BS or FS estimator samples at that batch; ``F.batch_norm`` call sites and
    sites of a model with a virtual batch (VDN, micro-batch) keep what the policy says.
    """
    from .api import _as_tuple, report, transform

    if not isinstance(model, nn.Module):
        raise TypeError(f"fxbns.tune takes an nn.Module; got {type(model).__name__}")
    args = _as_tuple(example_inputs)
    if args is None or not any(isinstance(a, torch.Tensor) for a in args):
        raise ValueError("fxbns.tune needs example_inputs: a training batch at the size you train with "
                         "(whether sampling pays off depends on the layer shapes)")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"fxbns.tune: steps must be an integer >= 1, got {steps!r}")
    if getattr(model, "_fxbns", None) is not None:
        raise ValueError("fxbns.tune takes the original model (as fxbns.transform does); this one was already "
                         "transformed: call fxbns.revert(model) first")
    pol = resolve_policy(policy)
    loss_fn = loss_fn if loss_fn is not None else _default_loss
    probe = next(a for a in args if isinstance(a, torch.Tensor))
    with torch.random.fork_rng(devices=[probe.device] if probe.device.type == "cuda" else []):
        gm = transform(model, _copy(pol), example_inputs=args, leaf_modules=leaf_modules,
                       concrete_args=concrete_args)  # transform works on a copy: model is untouched
        rows = {r["name"]: r for r in report(gm)}
        shapes = {n: tuple(r["shape"]) for n, r in rows.items() if r.get("shape")}
        sites = _sites(gm, set(rows), shapes, probe.device)
        gm.train()
        timers = {n: _Timer(m, probe) for n, m in sites.items()}
        specs = {n: m.estimator for n, m in sites.items()}
        exact = Exact()
        # per site: one (sampled (fwd, bwd), exact (fwd, bwd)) per step pair
        times: dict[str, list[tuple[tuple[float, float], tuple[float, float]]]] = {n: [] for n in sites}

        def step(sampled: bool) -> dict[str, tuple[float, float]]:
            for n, m in sites.items():
                m.estimator = specs[n] if sampled else exact
            for p in gm.parameters():
                p.grad = None
            loss_fn(gm(*args)).backward()
            return {n: t.take() for n, t in timers.items()}

        try:
            for i in range(warmup + steps):
                a = step(True)
                b = step(False)
                if i >= warmup:
                    for n in sites:
                        times[n].append((a[n], b[n]))
        finally:
            for t in timers.values():
                t.remove()
    out = _copy(pol)
    result_rows = []
    set_exact = []
    for n in sites:
        ts, te = zip(*times[n])
        diff = statistics.median(sum(s) - sum(e) for s, e in times[n])
        choice = "sampled" if diff < 0 else "exact"
        if choice == "exact":
            set_exact.append(n)
        result_rows.append({"name": n, "shape": list(shapes[n]), "estimator": specs[n].describe(),
                            "sampled_ms": _ms(ts), "exact_ms": _ms(te), "diff_ms": round(1e3 * diff, 4),
                            "sampled_fwd_ms": _ms(ts, 0), "sampled_bwd_ms": _ms(ts, 1),
                            "exact_fwd_ms": _ms(te, 0), "exact_bwd_ms": _ms(te, 1), "choice": choice})
    for n in set_exact:
        out.set_module_name(n, Exact())
    if out.fn is not None and set_exact:
        inner, chosen = out.fn, frozenset(set_exact)
        out.fn = lambda q, m, s: Exact() if q in chosen else inner(q, m, s)  # the callable outranks names
    out.preset = None
    return TuneResult(out, result_rows, steps)
