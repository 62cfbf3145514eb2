"""The public entry points: transform, explain, report, revert, save, load.

:func:`transform` returns the user's own model (its class, methods and attributes) with its BatchNorm
modules replaced in place.  Where a rewrite needs the traced graph (an ``F.batch_norm`` call in the code, or
the virtual batch of VDN / micro-batch), the model's ``forward`` runs the rewritten graph instead of its own
code, and it is still an instance of its class (see :mod:`fxbns.passes.forward`).

>>> import torch, torchvision
>>> import fxbns
>>> model = torchvision.models.resnet18(num_classes=10)
>>> m = fxbns.transform(model, "fs")
>>> isinstance(m, torchvision.models.ResNet), len(fxbns.report(m))
(True, 20)
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._version import __version__
from .distributed import describe_group
from .estimators import BatchSampling, Exact, FeatureSampling, VirtualDataset
from .modules import FunctionalBatchNorm, SampledBatchNorm
from .ops import dispatch
from .ops.dispatch import sample_backward_applies
from .passes.forward import install_graph_forward, uninstall_graph_forward
from .passes.match import Site, find_sites
from .passes.rewrite import rewrite_graph, rewritten, swap_modules
from .passes.virtual import VIRTUAL_NAME, VirtualBatch, inject_graph
from .policy import Policy, resolve_policy
from .report import Report, runs_at, sample_size
from .sampling import fs_fallback
from .tracing import trace

__all__ = ["transform", "explain", "report", "revert", "save", "load", "TransformInfo"]


@dataclass
class TransformInfo:
    """What :func:`transform` did, kept on the result as ``model._fxbns`` (read it with :func:`report`).

    Attributes:
        policy: the resolved policy.
        sites: the plan, one :class:`~fxbns.passes.match.Site` per BatchNorm site (shapes from
            ``example_inputs``).
        leaf_modules: the ``leaf_modules`` given to :func:`transform`.
        mode: ``"swap"`` (the model's own forward) or ``"graph"`` (its forward runs the traced graph).
        opaque: submodules traced as leaves, and why.
        root_error: why the root could not be traced, if so.
        virtual: the virtual batch's description, if any.
        functional: functional site name -> module path of its stand-in.
        added: attribute paths transform added to the model (stand-ins, the virtual batch, tensor constants).
        graphs: ``{True: training graph, False: eval graph}`` in graph mode (not pickled).
        version: the fxbns version.
    """

    policy: Policy
    sites: list[Site]
    leaf_modules: tuple[str, ...]
    mode: str = "swap"
    opaque: dict[str, str] = field(default_factory=dict)
    root_error: str | None = None
    virtual: str | None = None
    functional: dict[str, str] = field(default_factory=dict)
    added: list[str] = field(default_factory=list)
    graphs: dict[bool, fx.Graph] | None = None
    version: str = __version__

    def __getstate__(self):
        return {**self.__dict__, "graphs": None}  # fx graphs are not pickled; the forward's code is (on the class)

    def __deepcopy__(self, memo):
        new = copy.copy(self)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = copy.deepcopy(v, memo)
        return new


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
def _capture_shapes(model: nn.Module, args: tuple, targets: dict[str, str] | None = None
                    ) -> dict[str, tuple[int, ...]]:
    """Input shapes of every BN module (or of ``targets``: site name -> module path), from one eval-mode
    forward (state is not changed)."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []

    def hook(name):
        def record(mod, inp):
            if inp and isinstance(inp[0], torch.Tensor):
                shapes.setdefault(name, tuple(inp[0].shape))
        return record

    modules = dict(model.named_modules())
    if targets is None:
        targets = {n: n for n, m in modules.items() if isinstance(m, _BatchNorm)}
    for name, path in targets.items():
        if path in modules:
            handles.append(modules[path].register_forward_pre_hook(hook(name)))
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
        if not s.sync and policy.sync_for(s.name):
            s.sync, s.process_group = True, policy.sync_group
        if s.sync:
            _check_sync_spec(s, policy)
        elif spec is None:
            s.reason = "policy: exact"
    return traced, sites


def _check_sync_spec(s: Site, policy: Policy) -> None:
    """A synchronized site's estimator: exact, bs or fs (VDN's virtual rows are the same on every rank)."""
    if isinstance(s.spec, VirtualDataset):
        why = "an nn.SyncBatchNorm" if s.module_type == "SyncBatchNorm" else "Policy.set_sync"
        raise ValueError(
            f"site {s.name!r} is synchronized across processes ({why}) "
            f"but its estimator is {s.spec.describe()}: VirtualDataset statistics cannot be synchronized. Give "
            f"it exact, bs or fs statistics (Policy.set_module_name({s.name!r}, ...)), or leave it unsynchronized "
            f"(Policy.set_sync(module_name_regex=...))")
    if policy.micro is not None:
        s.notes.append("synchronized: not in the micro-batch regime (statistics from the whole group)")


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


# ------------------------------------------------------------------------------------------------ the report
def _short_reason(s: Site) -> str | None:
    """A few words for a site left as it is (the full sentence stays in the row's ``reason``)."""
    r = s.reason or ""
    for key, short in (("own forward", "BN subclass: own forward"),
                       ("FrozenBatchNorm2d", "frozen: fixed statistics"), ("LazyBatchNorm", "uninitialised lazy BN"),
                       ("run time", "momentum/eps computed at run time"), ("policy: exact", "policy: exact")):
        if key in r:
            return short
    return r[:40] or None


def _row(s: Site, *, spec, micro, shape, live_type: str, via: str | None, eager_rules: bool, is_cpu: bool,
         virtual: bool, replaced: str | None = None) -> dict[str, Any]:
    shape = tuple(shape) if shape is not None else None
    notes = list(s.notes)
    left_alone = s.reason is not None and s.reason != "policy: exact"
    if replaced is not None:
        runs, active, why = (None if shape is None else "exact"), None, f"now {live_type}: replaced after transform"
        notes.append(f"the module at this name is now a {live_type}, replaced after fxbns.transform; "
                     f"it runs its own code")
    elif left_alone:
        runs, active, why = (None if shape is None else "exact"), None, _short_reason(s)
    else:
        runs, active, why = runs_at(spec, micro, shape, eager_rules=eager_rules, is_cpu=is_cpu)
    if shape is None:
        why = "no shape: pass example_inputs" if replaced is None and not left_alone else why
    n, frac = sample_size(active, shape) if runs == "sampled" else (None, None)
    if n is not None and getattr(active, "sample_backward", False) and not s.sync and \
            not sample_backward_applies(active, n, shape[0] * math.prod(shape[2:])):
        why_off = ("BS's whole samples" if not isinstance(active, FeatureSampling) else
                   f"a sample of {n} values per channel ({frac:.3g} of the layer) is under "
                   f"{dispatch.MIN_SAMPLE_BACKWARD_VALUES} values or under {dispatch.MIN_SAMPLE_BACKWARD_FRACTION:g} "
                   f"of the layer")
        notes.append(f"sample_backward off here: {why_off} (the exact-gradient backward runs)")
    sampling = isinstance(spec, (BatchSampling, FeatureSampling))
    below = spec.exact_below_batch(shape) if sampling and shape is not None else None
    if below is not None and below > 1:
        notes.append(f"exact below batch {below} (min_elements {spec.min_elements})")
    fs = spec.real if isinstance(spec, VirtualDataset) else spec
    if isinstance(fs, FeatureSampling) and shape is not None and len(shape) == 2:
        notes.append(f"(N, C) input has no feature map: FS falls back to {fs_fallback(fs).describe()}")
    if spec is None and virtual and s.reason == "policy: exact":
        notes.append("statistics from the real rows only")
    if micro is not None and replaced is None and not left_alone:
        notes.append(f"micro-batch: at training batches <= {micro.threshold} "
                     f"{micro.estimator.describe()} (virtual rows appended)")
    if s.calls > 1:
        why = f"{why}; {s.calls} calls"
    sync = describe_group(s.process_group) if s.sync and replaced is None and not left_alone else None
    if runs is not None and why and why not in notes and replaced is None:
        notes.insert(0, f"{runs}: {why}")
    vb_at = None
    if replaced is None and not left_alone:
        vb_at = ("every training batch" if isinstance(spec, VirtualDataset)
                 else f"training batch <= {micro.threshold}" if micro is not None else None)
    return {"name": s.name, "kind": s.kind, "module_type": live_type, "producer": s.producer,
            "producer_name": s.producer_name, "shape": list(shape) if shape is not None else None,
            "estimator": spec.describe() if spec is not None else "exact", "spec": spec,
            "runs": runs, "why": why, "via": via, "active": active.describe() if active is not None else None,
            "virtual_batch": vb_at, "sample": n, "fraction": frac, "calls": s.calls,
            "exact_below_batch": below, "sync": sync,
            "reason": "; ".join([r for r in [s.reason] if r] + notes) or None}


def _explain_report(traced, sites, policy: Policy, vdesc, is_cpu: bool) -> Report:
    virtual = vdesc is not None
    graph = traced.graph is not None and (virtual or any(s.kind == "functional" and s.spec is not None
                                                          for s in sites))
    rows = []
    for s in sites:
        rewritten = s.reason is None or (s.reason == "policy: exact" and virtual)
        via = None if not rewritten else ("graph" if graph and s.kind != "inner" else "swap")
        rows.append(_row(s, spec=s.spec, micro=policy.micro if rewritten else None, shape=s.shape,
                         live_type=s.module_type, via=via, eager_rules=not virtual and s.kind != "functional",
                         is_cpu=is_cpu, virtual=virtual))
    return Report(rows, "graph" if graph else "swap", dict(traced.opaque), traced.root_error, vdesc,
                  _micro_desc(policy))


def _micro_desc(policy: Policy) -> str | None:
    m = policy.micro
    return f"batch <= {m.threshold}: {m.estimator.describe()}" if m is not None else None


def _live_report(model: nn.Module, info: TransformInfo, shapes: dict[str, tuple[int, ...]] | None) -> Report:
    modules = dict(model.named_modules())
    virtual = info.virtual is not None
    rows = []
    for s in info.sites:
        path = info.functional.get(s.name) if s.kind == "functional" else s.name
        m = modules.get(path) if path is not None else None
        shape = shapes.get(s.name) if shapes is not None else s.shape
        dev = next((t.device for t in (m.buffers() if m is not None else ())), None)
        is_cpu = dev is None or dev.type == "cpu"
        if isinstance(m, (SampledBatchNorm, FunctionalBatchNorm)):
            via = "graph" if info.mode == "graph" and s.kind != "inner" else "swap"
            eager = isinstance(m, SampledBatchNorm) and m._vstate is None
            spec = None if isinstance(m.estimator, Exact) else m.estimator
            rows.append(_row(s, spec=spec, micro=m.micro, shape=shape, live_type=type(m).__name__, via=via,
                             eager_rules=eager, is_cpu=is_cpu, virtual=virtual))
        elif s.kind == "functional":  # the model's own F.batch_norm call
            rows.append(_row(s, spec=None, micro=None, shape=shape, live_type=s.module_type, via=None,
                             eager_rules=False, is_cpu=is_cpu, virtual=virtual))
        else:
            live = type(m).__name__ if m is not None else "nothing"
            planned = s.reason is None or (s.reason == "policy: exact" and virtual)
            changed = planned or (m is not None and live != s.module_type)
            rows.append(_row(s, spec=None, micro=None, shape=shape, live_type=live, via=None, eager_rules=False,
                             is_cpu=is_cpu, virtual=virtual, replaced=live if changed else None))
    return Report(rows, info.mode, dict(info.opaque), info.root_error, info.virtual, _micro_desc(info.policy))


# ---------------------------------------------------------------------------------------------- transform
def transform(model: nn.Module, policy: Any = "fs", *, example_inputs=None, inplace: bool = False,
              leaf_modules=(), concrete_args=None) -> nn.Module:
    """Rewrite every BatchNorm of ``model`` into sampled-statistics code chosen by ``policy``.

    The result is the model itself (a deep copy unless ``inplace``): the same class, methods and
    attributes, with each ``nn.BatchNorm{1,2,3}d`` replaced at its name by a :class:`~fxbns.SampledBatchNorm`
    that shares its parameters and buffers, so ``state_dict()`` keys do not change.  Where the traced graph
    is needed (``F.batch_norm`` calls in the model's code, or the virtual batch of VDN and micro-batch
    policies), the model's ``forward`` runs the rewritten graph; its other methods (``features()``,
    ``forward_features()``) run its own code with the replaced modules.  Eval mode is exactly the original
    BatchNorm.  :func:`report` says what each site does.

    Args:
        model: the model (not changed unless ``inplace``).
        policy: a :class:`Policy`, a preset name (``exact``, ``bs``, ``fs``, ``vdn``, ``micro``), a JSON/YAML
            file path, a dict or a single estimator spec.
        example_inputs: an input batch (a tensor or a tuple of positional inputs): records each site's shape
            for the report, materialises lazy modules and creates the virtual samples.
        inplace: change ``model`` itself instead of a copy.
        leaf_modules: qualified names of submodules to trace as leaves (their BatchNorms are still replaced).
        concrete_args: passed to ``torch.fx`` tracing.

    Returns:
        The transformed model, an instance of ``type(model)``.

    >>> import torch, fxbns
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
    >>> t = fxbns.transform(m, "bs")
    >>> type(t).__name__, type(t[1]).__name__
    ('Sequential', 'SampledBatchNorm')
    >>> t(torch.randn(16, 3, 8, 8)).shape
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
    root = model if inplace else copy.deepcopy(model, _group_memo(model, pol))
    before = set(vars(root))
    traced, sites = _plan(root, pol, tuple(leaf_modules), concrete_args, example_inputs)
    constants = [k for k in vars(root) if k not in before and k.startswith("_tensor_constant")]
    if not sites:
        warnings.warn(f"fxbns.transform: {type(model).__name__} has no BatchNorm (no nn.BatchNorm module and no "
                      f"F.batch_norm call reached by tracing): nothing was rewritten", UserWarning, stacklevel=2)
    vb, vdesc = _virtual_config(pol, sites)
    vstate = vb.state if vb is not None else None
    rewrite_all = vb is not None
    res = swap_modules(root, sites, pol.micro, pol.seed, vstate, rewrite_all)
    args = _as_tuple(example_inputs)
    if vb is not None:
        x0 = _first_tensor(args) if args is not None else None
        if x0 is not None:
            vb.materialize(x0)
    functional = any(s.kind == "functional" and rewritten(s, rewrite_all) for s in sites)
    info = TransformInfo(pol, sites, tuple(leaf_modules), "swap", dict(traced.opaque), traced.root_error, vdesc)
    if traced.graph is None:
        if vb is not None:
            _attach_hooks(root, vb, pol.input_name)
            info.added.append(VIRTUAL_NAME)
            info.virtual = f"{vdesc}; by forward hooks on the root"
    elif vb is not None or functional:
        n_real = None
        if vb is not None:
            root.add_module(VIRTUAL_NAME, vb)
            info.added.append(VIRTUAL_NAME)
            n_real = inject_graph(traced.graph, pol.input_name)
        rewrite_graph(root, traced.graph, sites, pol.micro, pol.seed, vstate, n_real, rewrite_all, res)
        if traced.eval_graph is not None:
            rewrite_graph(root, traced.eval_graph, sites, pol.micro, pol.seed, vstate, None, rewrite_all, res)
        for k in constants:  # tensors the tracer lifted out of the code: buffers (moved by .to()), not state
            root.register_buffer(k, root.__dict__.pop(k), persistent=False)
        install_graph_forward(root, traced.graph, traced.eval_graph)
        if vb is not None:  # sites called after the forward (the user's own methods) see no virtual rows
            root._fxbns_hooks = (root.register_forward_hook(_end_virtual, always_call=True),)
        info.mode = "graph"
        info.functional = dict(res.functional)
        info.added += list(res.functional.values()) + constants
        info.graphs = {True: traced.graph, False: traced.eval_graph or traced.graph}
    if info.mode == "swap":
        for k in constants:  # only the (unused) traced graph reads them
            delattr(root, k)
    root._fxbns = info
    if res.swapped:  # training refuses to run once a swapped site is replaced (convert_sync_batchnorm)
        root._fxbns_hooks = getattr(root, "_fxbns_hooks", ()) + (root.register_forward_pre_hook(_check_sites),)
    _warn_sample_backward(root)
    return root


def _group_memo(model: nn.Module, policy: Policy | None = None) -> dict:
    """A ``copy.deepcopy`` memo that shares (does not copy) the process groups of the model and the policy: a
    ``torch.distributed`` process group cannot be copied, and a copy synchronizes over the same group."""
    groups = [policy.sync_group] if policy is not None else []
    info = getattr(model, "_fxbns", None)
    if info is not None:
        groups.append(info.policy.sync_group)
    groups += [m.__dict__.get("process_group") for m in model.modules()]
    return {id(g): g for g in groups if g is not None}


def _replaced_sites(model: nn.Module) -> list[str]:
    """Sites the transform swapped for fxbns modules that something replaced since (for example
    ``nn.SyncBatchNorm.convert_sync_batchnorm``, which turns every BatchNorm subclass into a plain SyncBatchNorm).
    The (parent, attribute) slots are worked out once per model object (a copy works them out again), so the
    check is a type test per site."""
    cached = model.__dict__.get("_fxbns_slots")
    if cached is None or cached[0] != id(model):
        info = model.__dict__.get("_fxbns")
        slots = []
        for s in (info.sites if info is not None else ()):
            if s.kind != "functional" and rewritten(s, info.virtual is not None):
                owner, _, attr = s.name.rpartition(".")
                try:
                    slots.append((model.get_submodule(owner) if owner else model, attr, s.name))
                except AttributeError:
                    continue
        cached = model.__dict__["_fxbns_slots"] = (id(model), slots)
    return [f"{name} (now {type(parent._modules.get(attr)).__name__})" for parent, attr, name in cached[1]
            if not isinstance(parent._modules.get(attr), SampledBatchNorm)]


def _check_sites(model: nn.Module, args) -> None:
    """Forward pre-hook of a transformed model: in training, refuse to run once a swapped site was replaced, which
    would train with other statistics than the report says and, with synchronized sites, mix fxbns's collectives
    with another module's (a type test per site; nothing on the tensors)."""
    if model.training and not torch.compiler.is_compiling():
        names = _replaced_sites(model)
        if names:
            more = f" and {len(names) - 5} more" if len(names) > 5 else ""
            raise RuntimeError(
                f"fxbns sites were replaced after fxbns.transform: {', '.join(names[:5])}{more}. They would train "
                f"with other statistics and collectives than fxbns.report says. nn.SyncBatchNorm."
                f"convert_sync_batchnorm does this; to synchronize statistics use Policy.set_sync(process_group) in "
                f"fxbns.transform (exact or sampled), or call convert_sync_batchnorm before transforming (its "
                f"SyncBatchNorms become synchronized fxbns sites)")


def _warn_sample_backward(model: nn.Module) -> None:
    """Say so when a rewritten site estimates its backward's sums from the sample: the sampling noise in every
    layer's input gradient costs accuracy on some models (``examples/train_parity.py``)."""
    # the test train_forward makes: only BS and FS specs have the field (a VDN spec's real sample is mixed with
    # virtual rows in more than one group, where sample_backward is not used)
    n = sum(bool(getattr(m.estimator, "sample_backward", False)) for m in model.modules()
            if isinstance(m, (SampledBatchNorm, FunctionalBatchNorm)))
    if n:
        warnings.warn(
            f"sample_backward is on for {n} BatchNorm site(s): where their sample is an FS sample of at least "
            f"{dispatch.MIN_SAMPLE_BACKWARD_FRACTION:g} of the layer and {dispatch.MIN_SAMPLE_BACKWARD_VALUES} values "
            f"per channel, the backward's two gradient sums come from it. Its noise costs accuracy on some models "
            f"(a MobileNet-style net on digits: -1.9 points against the same sample without it; "
            f"examples/train_parity.py, examples/gradient_stability.py). "
            f"Compare with it off before training with it (Policy.set_sample_backward(False), "
            f"or drop --sample-backward).", UserWarning, stacklevel=3)


def _end_virtual(root: nn.Module, args, output) -> None:
    """Forward hook of a graph-mode model with a virtual batch: no virtual rows after its forward."""
    getattr(root, VIRTUAL_NAME).state.n_real = None


def _attach_hooks(root: nn.Module, vb: VirtualBatch, input_name: str | None) -> None:
    """Virtual-batch injection for a model whose root could not be traced: forward hooks on the root."""
    from .passes.virtual import strip_virtual

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
    """Dry run: what :func:`transform` would do to each site, at the shapes of ``example_inputs``.

    Args:
        model: the model (not changed).
        policy: as for :func:`transform`.
        example_inputs: an input batch; without it the rows have no shape and ``runs`` is ``None``.
        leaf_modules: as for :func:`transform`.
        concrete_args: as for :func:`transform`.

    Returns:
        A :class:`Report`.

    >>> import torch, fxbns
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    >>> row = fxbns.explain(m, "bs", torch.randn(2, 3, 8, 8)).rows[0]
    >>> row["estimator"], row["runs"]
    ('bs(ratio=0.125, device speed rule)', 'exact')
    """
    pol = resolve_policy(policy)
    before = set(vars(model))
    try:
        traced, sites = _plan(model, pol, tuple(leaf_modules), concrete_args, example_inputs)
    finally:
        for k in [k for k in vars(model) if k not in before and k.startswith("_tensor_constant")]:
            delattr(model, k)  # the tracer's lifted constants: explain leaves the model as it was
    _, vdesc = _virtual_config(pol, sites)
    x0 = _first_tensor(_as_tuple(example_inputs) or ())
    return _explain_report(traced, sites, pol, vdesc, x0 is None or x0.device.type == "cpu")


def report(model: nn.Module, example_inputs=None) -> Report:
    """What each BatchNorm site of a transformed model computes in training, read from its live modules.

    A site replaced after :func:`transform` (e.g. by ``nn.SyncBatchNorm.convert_sync_batchnorm``) is
    reported as what it is now.

    Args:
        model: a model returned by :func:`transform`.
        example_inputs: an input batch to report at (its shapes are taken with one eval-mode forward; the
            model's state is not changed); ``None``: the shapes of transform's ``example_inputs``.

    Returns:
        A :class:`Report`.

    >>> import torch, fxbns
    >>> m = fxbns.transform(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)), "fs")
    >>> fxbns.report(m, torch.randn(2, 3, 8, 8)).rows[0]["runs"]
    'exact'
    >>> fxbns.report(m, torch.randn(512, 3, 34, 34)).rows[0]["runs"]
    'sampled'
    """
    info = getattr(model, "_fxbns", None)
    if info is None:
        raise ValueError("this model was not produced by fxbns.transform (use fxbns.explain for a dry run)")
    shapes = None
    args = _as_tuple(example_inputs)
    if args is not None:
        targets = {s.name: (info.functional.get(s.name) if s.kind == "functional" else s.name) for s in info.sites}
        shapes = _capture_shapes(model, args, {k: v for k, v in targets.items() if v is not None})
    return _live_report(model, info, shapes)


def revert(model: nn.Module) -> nn.Module:
    """A copy of a transformed model with plain BatchNorm modules holding the trained state.

    The copy is an instance of the model's own class running its own ``forward``; it has no virtual batch and
    the same ``state_dict()`` keys as the original model.

    Args:
        model: a model returned by :func:`transform`.

    Returns:
        The reverted copy (``model`` is not changed).

    >>> import torch, fxbns
    >>> m = fxbns.transform(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)), "fs")
    >>> type(fxbns.revert(m)[1]).__name__
    'BatchNorm2d'
    """
    info = getattr(model, "_fxbns", None)
    if info is None:
        raise ValueError("this model was not produced by fxbns.transform")
    out = copy.deepcopy(model, _group_memo(model))
    for name, m in list(out.named_modules()):
        if isinstance(m, SampledBatchNorm):
            out.set_submodule(name, m.to_batchnorm())
    for path in info.added:
        owner, _, attr = path.rpartition(".")
        parent = out.get_submodule(owner) if owner else out
        if hasattr(parent, attr):
            delattr(parent, attr)
    for h in getattr(out, "_fxbns_hooks", ()):
        h.remove()
    for attr in ("_fxbns_hooks", "_fxbns_rows", "_fxbns_slots"):
        out.__dict__.pop(attr, None)
    uninstall_graph_forward(out)
    del out._fxbns
    return out


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Store a transformed model's state_dict, policy and the fxbns version (atomically).

    Rebuild it with :func:`load` and the original architecture; no code is pickled.

    Args:
        model: a model returned by :func:`transform`.
        path: the file to write.

    Returns:
        None.

    >>> import os, tempfile, torch, fxbns
    >>> net = lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    >>> path = os.path.join(tempfile.mkdtemp(), "ck.pt")
    >>> fxbns.save(fxbns.transform(net(), "bs"), path)
    >>> type(fxbns.load(path, net())[1]).__name__
    'SampledBatchNorm'
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

    Args:
        path: a file written by :func:`save`.
        model: the original architecture (its weights are replaced by the checkpoint's).
        example_inputs: as for :func:`transform`.

    Returns:
        The transformed model holding the saved state (see :func:`save` for an example).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a file that is not an fxbns
    checkpoint or whose state does not fit ``model``.
    """
    from ._io import quiet_torch_load
    try:
        payload = quiet_torch_load(os.fspath(path))
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

