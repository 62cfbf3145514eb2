"""The public entry points: transform, explain, report, revert, save, load.

>>> import torch, torchvision
>>> import fxbns
>>> gm = fxbns.transform(torchvision.models.resnet18(num_classes=10), "fs")
>>> len(fxbns.report(gm))
20
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._version import __version__
from .estimators import BatchSampling, Exact, FeatureSampling, VirtualDataset
from .modules import TINY_MAP_MIN_NUMEL, FunctionalBatchNorm, SampledBatchNorm, tiny_map
from .passes.match import Site, find_sites
from .passes.rewrite import rewrite_graph, swap_modules
from .passes.virtual import VIRTUAL_NAME, VirtualBatch, inject_graph, strip_virtual
from .policy import Policy, resolve_policy
from .report import Report, sample_size
from .sampling import fs_fallback
from .tracing import DualGraphModule, trace

__all__ = ["transform", "explain", "report", "revert", "save", "load", "TransformInfo"]


@dataclass
class TransformInfo:
    """What :func:`transform` did, kept on the result as ``model._fxbns``."""

    policy: Policy
    report: Report
    leaf_modules: tuple[str, ...]
    version: str = __version__


def _as_tuple(example_inputs) -> tuple | None:
    if example_inputs is None:
        return None
    return example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def _first_tensor(args) -> torch.Tensor | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
    return None


@torch.no_grad()
def _capture_shapes(model: nn.Module, args: tuple) -> dict[str, tuple[int, ...]]:
    """Input shapes of every BN module, from one eval-mode forward (state is not changed)."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []

    def hook(name):
        def record(mod, inp):
            shapes.setdefault(name, tuple(inp[0].shape))
        return record

    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm):
            handles.append(m.register_forward_pre_hook(hook(name)))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        model(*args)
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.training = t
    return shapes


def _materialize_lazy(model: nn.Module, args: tuple | None) -> list[str]:
    """Materialise lazy modules with one eval forward on ``args``; returns the names still uninitialised."""
    def lazy():
        return [n for n, m in model.named_modules()
                if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params()]
    if args is not None and lazy():
        _capture_shapes(model, args)
    return lazy()


def _plan(model: nn.Module, policy: Policy, leaf_modules, concrete_args, example_inputs):
    args = _as_tuple(example_inputs)
    _materialize_lazy(model, args)
    traced = trace(model, leaf_modules, concrete_args)
    sites = find_sites(model, traced if traced.graph is not None else None)
    shapes = _capture_shapes(model, args) if args is not None else {}
    modules = dict(model.named_modules())
    names = [s.name for s in sites]
    policy.validate_names(names, list(modules))
    for s in sites:
        s.shape = shapes.get(s.name)
        if s.calls > 1:
            s.notes.append(f"shared: called from {s.calls} places; each call computes its own statistics")
        if s.reason is not None:
            continue
        spec = policy.spec_for(s.name, modules.get(s.name), s.producer, s)
        s.spec = spec
        if spec is None:
            s.reason = "policy: exact"
    return traced, sites


def _virtual_config(policy: Policy, sites: list[Site]) -> tuple[VirtualBatch | None, str | None]:
    vdn = [s.spec for s in sites if isinstance(s.spec, VirtualDataset)]
    micro = policy.micro
    if not vdn and micro is None:
        return None, None
    specs = vdn + ([micro.estimator] if micro is not None else [])
    n = max(v.num_samples for v in specs)
    first = specs[0]
    vb = VirtualBatch(n, None if vdn else micro.threshold, first.distribution, first.seed)
    return vb, vb.extra_repr()


def _rows(sites: list[Site], virtual: bool) -> list[dict[str, Any]]:
    rows = []
    for s in sites:
        n, frac = sample_size(s.spec, s.shape)
        notes = list(s.notes)
        fs = s.spec.real if isinstance(s.spec, VirtualDataset) else s.spec
        below = (s.spec.exact_below_batch(tuple(s.shape))
                 if isinstance(s.spec, (BatchSampling, FeatureSampling)) and s.shape is not None else None)
        if below is not None and below > 1:
            notes.append(f"exact below batch {below} (min_elements {s.spec.min_elements})")
        if (isinstance(s.spec, (BatchSampling, FeatureSampling)) and s.spec.min_elements > 0 and s.shape is not None
                and tiny_map(s.shape)):
            notes.append(f"eager CPU training: exact from {TINY_MAP_MIN_NUMEL} elements "
                         f"(maps of 2-4 elements: faster than sampling there)")
        if isinstance(fs, FeatureSampling) and s.shape is not None and len(s.shape) == 2:
            notes.append(f"(N, C) input has no feature map: FS falls back to {fs_fallback(fs).describe()}")
        if s.spec is None and virtual and s.reason == "policy: exact":
            notes.append("statistics from the real rows only")
        rows.append({"name": s.name, "kind": s.kind, "module_type": s.module_type, "producer": s.producer,
                     "producer_name": s.producer_name, "shape": list(s.shape) if s.shape else None,
                     "estimator": s.spec.describe() if s.spec is not None else "exact",
                     "spec": s.spec, "sample": n, "fraction": frac, "calls": s.calls,
                     "exact_below_batch": below,
                     "reason": "; ".join([r for r in [s.reason] if r] + notes) or None})
    return rows


def _make_report(traced, sites, policy, virtual_desc) -> Report:
    return Report(_rows(sites, virtual_desc is not None), "graph" if traced.graph is not None else "swap",
                  dict(traced.opaque), traced.root_error, virtual_desc,
                  f"batch <= {policy.micro.threshold}: {policy.micro.estimator.describe()}" if policy.micro else None)


def transform(model: nn.Module, policy: Any = "fs", *, example_inputs=None, inplace: bool = False,
              leaf_modules=(), concrete_args=None) -> nn.Module:
    """Rewrite every BatchNorm of ``model`` into sampled-statistics code chosen by ``policy``.

    ``policy``: a :class:`Policy`, a preset name (``exact``, ``bs``, ``fs``, ``vdn``, ``micro``), a
    JSON/YAML file path, a dict or a single estimator spec.  Returns an ``fx.GraphModule`` (a
    :class:`~fxbns.tracing.DualGraphModule` when train and eval trace differently); if the root's own
    forward cannot be traced, the model itself with its BatchNorms swapped in place.  Eval mode is
    exactly the original BatchNorm; ``model._fxbns.report`` describes every site.

    >>> import torch, fxbns
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
    >>> gm = fxbns.transform(m, "bs")
    >>> gm(torch.randn(16, 3, 8, 8)).shape
    torch.Size([16, 8, 6, 6])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"transform takes an nn.Module; got {type(model).__name__}")
    if getattr(model, "_fxbns", None) is not None:
        raise ValueError("this model was already transformed by fxbns; call fxbns.revert(model) first, "
                         "or transform the original model")
    pol = resolve_policy(policy)
    lazy = _materialize_lazy(model, _as_tuple(example_inputs))
    if lazy and not inplace:
        raise ValueError(f"the model has uninitialised lazy modules ({', '.join(lazy[:3])}), which cannot be "
                         f"copied: pass example_inputs=... to materialise them, run one forward first, or use "
                         f"inplace=True (lazy BatchNorms are then left exact)")
    root = model if inplace else copy.deepcopy(model)
    traced, sites = _plan(root, pol, tuple(leaf_modules), concrete_args, example_inputs)
    vb, vdesc = _virtual_config(pol, sites)
    vstate = vb.state if vb is not None else None
    rewrite_all = vb is not None
    res = swap_modules(root, sites, pol.micro, pol.seed, vstate, rewrite_all)
    args = _as_tuple(example_inputs)
    if vb is not None:
        x0 = _first_tensor(args) if args is not None else None
        if x0 is not None:
            vb.materialize(x0)
    if traced.graph is None:
        if vb is not None:
            _attach_hooks(root, vb, pol.input_name)
        out = root
    else:
        n_real = None
        if vb is not None:
            root.add_module(VIRTUAL_NAME, vb)
            n_real = inject_graph(traced.graph, pol.input_name)
        rewrite_graph(root, traced.graph, sites, pol.micro, pol.seed, vstate, n_real, rewrite_all, res)
        if traced.eval_graph is not None:
            rewrite_graph(root, traced.eval_graph, sites, pol.micro, pol.seed, vstate, None, rewrite_all, res)
        out = DualGraphModule(root, traced.graph, traced.eval_graph, type(model).__name__)
    out._fxbns = TransformInfo(pol, _make_report(traced, sites, pol, vdesc), tuple(leaf_modules))
    _warn_sample_backward(out)
    return out


def _warn_sample_backward(model: nn.Module) -> None:
    """Say so when a rewritten site estimates its backward's sums from the sample: on deep models that
    inflates gradients, with fs enough to diverge (measured in ``examples/gradient_stability.py``)."""
    # the test train_forward makes: only BS and FS specs have the field (a VDN spec's real sample is mixed with
    # virtual rows in more than one group, where sample_backward is not used)
    n = sum(bool(getattr(m.estimator, "sample_backward", False)) for m in model.modules()
            if isinstance(m, (SampledBatchNorm, FunctionalBatchNorm)))
    if n:
        warnings.warn(
            f"sample_backward is on for {n} BatchNorm site(s): their backward's statistics' term lands on the "
            f"sampled elements only, with sums estimated from a sample, which inflates gradients on deep models "
            f"(resnet50 from random weights: 14x exact BatchNorm's gradient norm with bs, a NaN loss with fs; "
            f"examples/gradient_stability.py). Check gradient norms before training with it, or turn it off "
            f"(Policy.set_sample_backward(False), or drop --sample-backward).", UserWarning, stacklevel=3)


def _attach_hooks(root: nn.Module, vb: VirtualBatch, input_name: str | None) -> None:
    """Virtual-batch injection for a model whose root could not be traced: forward hooks on the root."""
    root.add_module(VIRTUAL_NAME, vb)

    def pre(mod, args, kwargs):
        if input_name is not None and input_name in kwargs:
            x = kwargs[input_name]
            if isinstance(x, torch.Tensor):
                xv, n_real, n_total = vb(x)
                mod._fxbns_rows = (n_real, n_total)
                return args, {**kwargs, input_name: xv}
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                xv, n_real, n_total = vb(a)
                mod._fxbns_rows = (n_real, n_total)
                return args[:i] + (xv,) + args[i + 1:], kwargs
        raise ValueError("VDN / micro-batch needs a tensor model input to append virtual samples to; this model's "
                         "first input is not a tensor (e.g. a list of images). Use the bs or fs presets.")

    def post(mod, args, kwargs, output):
        n_real, n_total = getattr(mod, "_fxbns_rows", (0, 0))
        vb.state.n_real = None
        return strip_virtual(output, n_real, n_total)

    root._fxbns_hooks = (root.register_forward_pre_hook(pre, with_kwargs=True),
                         root.register_forward_hook(post, with_kwargs=True))


def explain(model: nn.Module, policy: Any = "fs", example_inputs=None, *, leaf_modules=(),
            concrete_args=None) -> Report:
    """Dry run: what :func:`transform` would do to each site.  The model is not changed.

    >>> import torch, fxbns
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    >>> fxbns.explain(m, "bs", torch.randn(2, 3, 8, 8)).rows[0]["estimator"]
    'bs(ratio=0.125, exact below 262144)'
    """
    pol = resolve_policy(policy)
    traced, sites = _plan(model, pol, tuple(leaf_modules), concrete_args, example_inputs)
    _, vdesc = _virtual_config(pol, sites)
    return _make_report(traced, sites, pol, vdesc)


def report(model: nn.Module) -> Report:
    """The per-site report of a transformed model."""
    info = getattr(model, "_fxbns", None)
    if info is None:
        raise ValueError("this model was not produced by fxbns.transform (use fxbns.explain for a dry run)")
    return info.report


def revert(model: nn.Module) -> nn.Module:
    """A copy of a transformed model with plain BatchNorm modules holding the trained state.

    The result has no virtual batch and the same ``state_dict()`` keys as the original model.
    """
    info = getattr(model, "_fxbns", None)
    if info is None:
        raise ValueError("this model was not produced by fxbns.transform")
    out = copy.deepcopy(model)
    for name, m in list(out.named_modules()):
        if isinstance(m, SampledBatchNorm):
            out.set_submodule(name, m.to_batchnorm())
        elif isinstance(m, FunctionalBatchNorm):
            m.estimator, m.micro = Exact(), None
    graphs = {id(g): g for g in out.graphs().values()}.values() if isinstance(out, DualGraphModule) else ()
    for g in graphs:
        _remove_virtual(g)
    if hasattr(out, VIRTUAL_NAME):
        delattr(out, VIRTUAL_NAME)
    for h in getattr(out, "_fxbns_hooks", ()):
        h.remove()
    if isinstance(out, DualGraphModule):
        out.recompile()
    out._fxbns = None
    return out


def _remove_virtual(g: fx.Graph) -> None:
    inj = next((n for n in g.nodes if n.op == "call_module" and n.target == VIRTUAL_NAME), None)
    if inj is None:
        return
    x = inj.args[0]
    n_real = None
    for u in list(inj.users):
        if u.args[1] == 0:
            u.replace_all_uses_with(x)
        elif u.args[1] == 1:
            n_real = u
    for n in list(g.nodes):
        if n.op == "call_function" and n.target is strip_virtual:
            n.replace_all_uses_with(n.args[0])
            g.erase_node(n)
    if n_real is not None:
        for u in list(n_real.users):
            u.args = tuple(a for a in u.args if a is not n_real)
    for u in list(inj.users):
        g.erase_node(u)
    g.erase_node(inj)
    g.lint()


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Store a transformed model's state_dict, policy and the fxbns version (atomically).

    Rebuild it with :func:`load` and the original architecture; no GraphModule is pickled.
    """
    from ._io import atomic_write
    info = getattr(model, "_fxbns", None)
    if info is None:
        raise ValueError("fxbns.save takes a model returned by fxbns.transform; for a plain model use torch.save")
    payload = {"format": "fxbns-checkpoint", "fxbns_version": info.version, "policy": info.policy.to_dict(),
               "leaf_modules": list(info.leaf_modules), "state_dict": model.state_dict()}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load(path: str | os.PathLike, model: nn.Module, *, example_inputs=None) -> nn.Module:
    """Rebuild a transformed model from :func:`save` output and the original (untransformed) ``model``.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a file that is not an fxbns
    checkpoint or whose state does not fit ``model``.
    """
    try:
        payload = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such checkpoint: {os.fspath(path)!r}") from None
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{os.fspath(path)!r} is not a readable fxbns checkpoint: {e}") from None
    if not isinstance(payload, dict) or payload.get("format") != "fxbns-checkpoint":
        raise ValueError(f"{os.fspath(path)!r} is not an fxbns checkpoint (fxbns.save writes those)")
    gm = transform(model, Policy.from_dict(payload["policy"]), example_inputs=example_inputs,
                   leaf_modules=tuple(payload.get("leaf_modules", ())))
    try:
        gm.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise ValueError(f"the checkpoint {os.fspath(path)!r} does not fit this {type(model).__name__}: "
                         f"{'; '.join(lines[1:3])[:400]}. Pass the architecture (and settings such as num_classes) "
                         f"the checkpoint was saved from") from None
    return gm

