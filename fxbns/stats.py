"""Statistics tools: :func:`recalibrate` (population statistics, PreciseBN) and :func:`calibrate` (a policy
chosen per layer from the measured correlation of its features).

Both run the model's own training forward on a few real batches, under ``no_grad``, with hooks on every
BatchNorm site (``nn.BatchNorm*`` modules, fxbns' sampled modules and ``F.batch_norm`` stand-ins, and plain
``F.batch_norm`` calls), and leave the model as they found it: modes, momentum, parameters,
``num_batches_tracked``, the sampling step counters, the virtual samples and the global RNG.  Only
:func:`recalibrate` writes, and only ``running_mean`` and ``running_var``.

>>> import torch, fxbns
>>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
>>> batches = [torch.randn(16, 3, 12, 12) for _ in range(4)]
>>> fxbns.recalibrate(m, batches, num_batches=4).batches
4
>>> type(fxbns.calibrate(m, batches).policy).__name__
'Policy'
"""

from __future__ import annotations

import inspect
import itertools
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from .estimators import BatchSampling, Exact, FeatureSampling, VirtualDataset, layer_size, spec_to_dict
from .modules import FunctionalBatchNorm, SampledBatchNorm
from .passes.virtual import VirtualBatch
from .policy import Policy
from .sampling import band_plan

__all__ = ["recalibrate", "calibrate", "RecalibrationResult", "CalibrationResult", "SiteRecalibration"]


# ---------------------------------------------------------------------------------------------------------------
# capturing the input of every BatchNorm site during a training forward
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class _SiteRef:
    """One BatchNorm site met in the forward: its name, where its running statistics live."""

    name: str
    kind: str  # "module" (an nn.BatchNorm / SampledBatchNorm module) or "functional" (F.batch_norm call or stand-in)
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    module: nn.Module | None = None


@dataclass
class _Frame:
    """A plain BatchNorm module's forward in progress: its site, input, and whether its statistics were taken."""

    site: _SiteRef
    input: Any
    done: bool


_F_BN_SIG = inspect.signature(F.batch_norm)
_TORCH_BN_ARGS = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps",
                  "cudnn_enabled")


class _Capture(TorchFunctionMode):
    """Calls ``consume(site, x_real)`` for every BatchNorm site call of a forward, with the virtual rows of a
    VDN / micro-batch model cut off (``x_real`` is the first ``n_real`` rows).

    fxbns' modules (sampled modules and ``F.batch_norm`` stand-ins) are seen through forward pre-hooks, with the
    real-row count they are called with.  Every ``F.batch_norm`` / ``torch.batch_norm`` call outside them goes
    through this torch function mode, which also sets its momentum to 0 so that it leaves its running
    statistics alone.  Inside the forward of a plain ``nn.BatchNorm*`` module, the call with that module's
    running statistics is the module's site, with the input the call normalises: a BatchNorm subclass that
    normalises part of its input itself and passes the rest to child BatchNorms (timm's ``SplitBatchNorm2d``)
    gives each site its own rows.  A plain module whose forward makes no such call (a synchronized
    ``SyncBatchNorm``, a subclass with its own arithmetic) is counted with its whole input.  Calls outside any
    BatchNorm module are functional sites.
    """

    def __init__(self, model: nn.Module, consume: Callable[[_SiteRef, torch.Tensor], None],
                 consume_virtual: Callable[[_SiteRef, nn.Module, int, torch.Tensor], None] | None = None) -> None:
        super().__init__()
        self.model = model
        self._consume = consume
        self._consume_virtual = consume_virtual  # (site, fxbns module, real rows, virtual rows): VDN sites
        self.depth = 0  # > 0 inside an fxbns module's forward (its own batch_norm calls are not new sites)
        self.frames: list[_Frame] = []  # the plain BatchNorm modules whose forward is running, innermost last
        self.virtual = [m for m in model.modules() if isinstance(m, VirtualBatch)]
        self.names = {id(t): n for n, t in itertools.chain(model.named_buffers(remove_duplicate=False),
                                                           model.named_parameters(remove_duplicate=False))}
        self.functional: dict[int, _SiteRef] = {}  # id(running_mean) (or of the stand-in) -> site
        self.per_owner: dict[str, int] = {}
        self.snapshots: list[tuple[torch.Tensor, torch.Tensor]] = []  # functional running stats at first sight
        self.handles = []
        for name, m in model.named_modules():
            if isinstance(m, SampledBatchNorm):
                site = _SiteRef(name, "module", m.running_mean, m.running_var, m)
                self.handles.append(m.register_forward_pre_hook(self._module_pre(site), with_kwargs=True))
                self.handles.append(m.register_forward_hook(self._post))
            elif isinstance(m, _BatchNorm):
                site = _SiteRef(name, "module", m.running_mean, m.running_var, m)
                self.handles.append(m.register_forward_pre_hook(self._plain_pre(site), with_kwargs=True))
                self.handles.append(m.register_forward_hook(self._plain_post))
            elif isinstance(m, FunctionalBatchNorm):
                self.handles.append(m.register_forward_pre_hook(self._standin_pre(m), with_kwargs=True))
                self.handles.append(m.register_forward_hook(self._post))

    def consume(self, site: _SiteRef, x: torch.Tensor) -> None:
        with torch._C.DisableTorchFunction():  # the statistics' own arithmetic is not the model's: not intercepted
            self._consume(site, x)

    def consume_rows(self, site: _SiteRef, mod: nn.Module, x: torch.Tensor, n_real: int) -> None:
        """The real rows to ``consume``; the virtual rows of an fxbns site to ``consume_virtual``."""
        self.consume(site, x[:n_real])
        if self._consume_virtual is not None and n_real < x.shape[0]:
            with torch._C.DisableTorchFunction():
                self._consume_virtual(site, mod, n_real, x[n_real:])

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    # -- rows that are real ----------------------------------------------------------------------------------
    def _n_real(self, module: nn.Module | None, x: torch.Tensor, n_real: Any) -> int:
        if n_real is None and module is not None:
            vs = getattr(module, "_vstate", None)
            n_real = vs.n_real if vs is not None else None
        if n_real is None:  # a BatchNorm fxbns did not rewrite, downstream of the virtual batch
            n_real = next((v.state.n_real for v in self.virtual if v.state.n_real is not None), None)
        n = x.shape[0]
        return n if n_real is None else min(int(n_real), n)

    # -- module sites ----------------------------------------------------------------------------------------
    def _module_pre(self, site: _SiteRef):
        def pre(mod, args, kwargs):
            self.depth += 1
            if self.depth == 1 and mod.training and args:
                x = args[0]
                n_real = args[1] if len(args) > 1 else kwargs.get("n_real")
                self.consume_rows(site, mod, x, self._n_real(mod, x, n_real))
        return pre

    def _standin_pre(self, mod: FunctionalBatchNorm):
        def pre(m, args, kwargs):
            self.depth += 1
            if self.depth == 1 and m.training and args:
                a = list(args) + [None] * (6 - len(args))
                x, rm, rv = a[0], kwargs.get("running_mean", a[1]), kwargs.get("running_var", a[2])
                n_real = kwargs.get("n_real", a[5])
                site = self._functional_site(rm, rv, mod)
                self.consume_rows(site, mod, x, self._n_real(mod, x, n_real))
        return pre

    def _post(self, mod, args, out):
        self.depth -= 1

    def _plain_pre(self, site: _SiteRef):
        def pre(mod, args, kwargs):
            x = args[0] if args else kwargs.get("input")
            skip = self.depth > 0 or not mod.training or not isinstance(x, torch.Tensor)
            self.frames.append(_Frame(site, x, done=skip))
        return pre

    def _frame_of(self, rm: torch.Tensor | None) -> _Frame | None:
        """The running plain BatchNorm module a batch_norm call with running mean ``rm`` normalises for: the one
        that owns ``rm``, or (``rm`` None) the innermost one, if it has no running statistics either.  A module may
        make several such calls (ghost batch norm: one per slice of its batch); each counts."""
        if rm is None:
            f = self.frames[-1] if self.frames else None
            return f if f is not None and f.site.running_mean is None else None
        return next((f for f in reversed(self.frames) if f.site.running_mean is rm), None)

    def _plain_post(self, mod, args, out):
        f = self.frames.pop()
        if not f.done:  # its forward made no batch_norm call with its statistics: count its whole input
            self.consume_rows(f.site, mod, f.input, self._n_real(None, f.input, None))

    # -- functional sites ------------------------------------------------------------------------------------
    def _functional_site(self, rm: torch.Tensor | None, rv: torch.Tensor | None, key_obj: Any) -> _SiteRef:
        key = id(rm) if rm is not None else id(key_obj)
        site = self.functional.get(key)
        if site is None:
            # named as fxbns' site finder names it: the owner of the statistics' buffers + ".batch_norm",
            # then "#k" for the k-th functional call of the same owner (in call order, which is graph order)
            owner = self.names.get(id(rm), "").rpartition(".")[0] if rm is not None else ""
            k = self.per_owner.get(owner, 0)
            self.per_owner[owner] = k + 1
            name = f"{owner + '.' if owner else ''}batch_norm" + (f"#{k}" if k else "")
            site = _SiteRef(name, "functional", rm, rv, key_obj if isinstance(key_obj, nn.Module) else None)
            self.functional[key] = site
            if rm is not None and rv is not None:
                self.snapshots.append((rm, rm.detach().clone()))
                self.snapshots.append((rv, rv.detach().clone()))
        return site

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm or func is torch.batch_norm:
            if func is F.batch_norm:
                b = _F_BN_SIG.bind(*args, **kwargs)
                b.apply_defaults()
                a = dict(b.arguments)
            else:
                a = dict(zip(_TORCH_BN_ARGS, args))
                a.update(kwargs)
            if self.depth == 0 and a.get("training"):
                x, rm, rv = a["input"], a.get("running_mean"), a.get("running_var")
                frame = self._frame_of(rm)
                if frame is not None:
                    frame.done = True
                    site = frame.site
                elif self.frames:
                    return func(*args, **kwargs)  # a plain module's own arithmetic on other tensors
                else:
                    site = self._functional_site(rm, rv, func)
                self.consume(site, x[:self._n_real(None, x, None)])
                if rm is not None:  # keep the running statistics as they are during the pass
                    a["momentum"] = 0.0
                    if func is F.batch_norm:
                        return func(**a)
                    return func(*(a[k] for k in _TORCH_BN_ARGS))
        return func(*args, **kwargs)


class _ModelState:
    """Everything a training forward changes outside the running statistics, saved to be put back: module
    modes, BatchNorm momentum and ``num_batches_tracked``, fxbns' step counters (``_fxbns_step`` and
    ``_host_step``), virtual samples made on the first training batch, the virtual batch's row count, RNG."""

    def __init__(self, model: nn.Module) -> None:
        self.root = model
        self.modes = [(m, m.training) for m in model.modules()]
        self.momenta = [(m, m.momentum) for m in model.modules() if isinstance(m, (_BatchNorm, FunctionalBatchNorm))]
        self.tensors: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.host_steps = []
        self.virtual = []
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                for t in (m.num_batches_tracked, m.running_mean, m.running_var):
                    if t is not None:
                        self.tensors.append((t, t.detach().clone()))
            step = m._buffers.get("_fxbns_step")
            if step is not None:
                self.tensors.append((step, step.detach().clone()))
            if "_host_step" in m.__dict__:
                self.host_steps.append((m, m.__dict__["_host_step"]))
            if isinstance(m, VirtualBatch):
                self.virtual.append((m, m.samples, m.state.n_real))

    def prepare(self) -> None:
        """Training mode everywhere, momentum 0 (running statistics stay put during the pass)."""
        self.root.train()  # through train(): a transformed model switches to its training graph
        for m, _ in self.momenta:
            m.momentum = 0.0

    def restore(self) -> None:
        """Put it all back."""
        self.root.train(self.modes[0][1])  # the root's graph for its mode, then every module's own flag
        for m, t in self.modes:
            m.training = t
        for m, mom in self.momenta:
            m.momentum = mom
        with torch.no_grad():
            for t, saved in self.tensors:
                t.copy_(saved)
        for m, s in self.host_steps:
            m.__dict__["_host_step"] = s
        for vb, samples, n_real in self.virtual:
            vb.samples = samples
            vb.state.n_real = n_real


def _rng_devices(model: nn.Module) -> list[int]:
    devs = {t.device.index or 0 for t in itertools.chain(model.parameters(), model.buffers()) if t.is_cuda}
    return sorted(devs)


def _model_device(model: nn.Module) -> torch.device | None:
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.device.type != "meta":
            return t.device
    return None


def _input_of(batch: Any, what: str, i: int) -> Any:
    """The model input of one element of ``batches``: the element, or the first item of a tuple/list."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError(f"{what}: batch {i} is an empty {type(batch).__name__}; give input tensors, or "
                             f"tuples/lists whose first item is the input")
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise ValueError(f"{what}: batch {i} is a {type(batch).__name__}, not a tensor; give input tensors, or "
                         f"tuples/lists whose first item is the input tensor (as a DataLoader yields)")
    return batch


class _Progress:
    """A one-line progress bar on stderr (shown only when asked for)."""

    def __init__(self, total: int, label: str, enabled: bool) -> None:
        self.total, self.label, self.enabled = total, label, enabled
        self.t0 = time.perf_counter()
        self.done = 0

    def step(self) -> None:
        self.done += 1
        if not self.enabled:
            return
        width = 30
        frac = self.done / self.total if self.total else 1.0
        bar = "#" * int(frac * width)
        dt = time.perf_counter() - self.t0
        sys.stderr.write(f"\r{self.label} [{bar:{width}s}] {self.done}/{self.total} batches, {dt:.1f} s")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.done:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _check_num_batches(num_batches: Any, what: str) -> None:
    if not isinstance(num_batches, int) or isinstance(num_batches, bool) or num_batches < 1:
        raise ValueError(f"{what}: num_batches must be an integer >= 1; got {num_batches!r}")


def _run(model: nn.Module, inputs: Iterable[torch.Tensor], consume, what: str, progress: _Progress | None = None,
         consume_virtual=None) -> tuple[int, list[_SiteRef], list[tuple[torch.Tensor, torch.Tensor]]]:
    """The training forward on every input, ``consume`` called per site call (``consume_virtual`` for the virtual
    rows of fxbns sites).  Returns (batches run, the functional sites met, their running statistics as first
    seen).  The caller restores the model."""
    dev = _model_device(model)
    cap = _Capture(model, consume, consume_virtual)
    n = 0
    try:
        with cap:
            for x in inputs:
                if dev is not None and x.device != dev:
                    x = x.to(dev)
                try:
                    model(x)
                except Exception as e:
                    if isinstance(e, _CalibrationInputError):
                        raise
                    raise ValueError(f"{what}: the model does not run on batch {n} (shape {tuple(x.shape)}): "
                                     f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                                     ) from e
                n += 1
                if progress is not None:
                    progress.step()
    finally:
        cap.remove()
    return n, list(cap.functional.values()), cap.snapshots


class _CalibrationInputError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------------------------
# recalibrate
# ---------------------------------------------------------------------------------------------------------------

class _Moments:
    """Per-channel count, mean and sum of squared deviations, combined batch by batch (Chan et al.) in float64."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        if x.shape[0] == 0:
            return
        c = x.shape[1] if x.dim() > 1 else 1
        v = x.detach().transpose(0, 1).reshape(c, -1).to(torch.float64) if x.dim() > 1 else x.detach().double()[None]
        nb = v.shape[1]
        mb = v.mean(1)
        m2b = (v - mb[:, None]).pow(2).sum(1)
        if self.mean is None:
            self.n, self.mean, self.m2 = nb, mb, m2b
            return
        tot = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / tot)
        self.m2 = self.m2 + m2b + delta.pow(2) * (self.n * nb / tot)
        self.n = tot


@dataclass(frozen=True)
class SiteRecalibration:
    """One site's statistics before and after :func:`recalibrate`.

    ``count``: activations per channel pooled; ``mean_shift``: RMS over channels of
    ``|new mean - old mean| / new std``; ``var_change``: RMS over channels of ``|new var / old var - 1|``.
    """

    name: str
    kind: str
    channels: int
    count: int
    old_mean: torch.Tensor
    old_var: torch.Tensor
    new_mean: torch.Tensor
    new_var: torch.Tensor
    mean_shift: float
    var_change: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "channels": self.channels, "count": self.count,
                "mean_shift": self.mean_shift, "var_change": self.var_change,
                "old_mean": self.old_mean.tolist(), "old_var": self.old_var.tolist(),
                "new_mean": self.new_mean.tolist(), "new_var": self.new_var.tolist()}


@dataclass
class RecalibrationResult:
    """What :func:`recalibrate` did: one :class:`SiteRecalibration` per site written, the batches and samples
    used, and the sites it could not recompute (``skipped``: name -> why)."""

    sites: list[SiteRecalibration]
    batches: int
    requested: int
    samples: int
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def ran_out(self) -> bool:
        """Whether the data ended before ``num_batches``."""
        return self.batches < self.requested

    def __len__(self) -> int:
        return len(self.sites)

    def to_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "requested": self.requested, "samples": self.samples,
                "ran_out": self.ran_out, "skipped": dict(self.skipped), "sites": [s.to_dict() for s in self.sites]}

    def __str__(self) -> str:
        cols = ["name", "channels", "values/channel", "mean shift (std)", "var change"]
        rows = [[s.name, str(s.channels), str(s.count), f"{s.mean_shift:.4f}", f"{100 * s.var_change:.2f}%"]
                for s in self.sites]
        lines = _table(cols, rows)
        used = (f"{self.batches} batches ({self.samples} samples)" if not self.ran_out else
                f"{self.batches} of the {self.requested} batches asked for ({self.samples} samples): the data ran out")
        lines.append(f"{len(self.sites)} BatchNorm sites recalibrated over {used}")
        for name, why in self.skipped.items():
            lines.append(f"not recalibrated: {name}: {why}")
        return "\n".join(lines)

    __repr__ = __str__


def _table(cols: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    return lines


@torch.no_grad()
def _vdn_population(spec: VirtualDataset, real: _Moments, virtual: _Moments) -> tuple[torch.Tensor, torch.Tensor]:
    """A VDN site's statistics with the real part taken over the whole population: the virtual rows' moments
    pooled with the real rows' with weights ``mix`` and ``1 - mix``, as the site pools them in training
    (``mean = sum_k w_k mean_k``, ``var = sum_k w_k mean_k((x - mean)^2)``), unbiased with the pooled count."""
    w = float(spec.mix)
    vm, vv = virtual.mean, virtual.m2 / max(virtual.n, 1)
    rm, rv = real.mean, real.m2 / max(real.n, 1)
    mean = w * vm + (1 - w) * rm
    var = w * (vv + (vm - mean).pow(2)) + (1 - w) * (rv + (rm - mean).pow(2))
    n = virtual.n + real.n
    return mean, var * (n / max(n - 1, 1))


def recalibrate(model: nn.Module, batches: Iterable[Any], num_batches: int = 200, progress: bool = False
                ) -> RecalibrationResult:
    """Recompute every BatchNorm site's running mean and variance as population statistics (PreciseBN).

    The model's training forward runs on up to ``num_batches`` batches (as ``torch.optim.swa_utils.update_bn``
    and fvcore's ``update_bn_stats`` do); hooks collect the input of every site, and at the end each site's
    ``running_mean`` is the mean of all its activations and ``running_var`` their unbiased variance, pooled as
    if all batches were one (so any split of the same data gives the same statistics), accumulated in float64.
    Sites: ``nn.BatchNorm*`` modules, fxbns' sampled modules and ``F.batch_norm`` stand-ins (sampled or exact),
    and plain ``F.batch_norm`` calls with running statistics.  Virtual (VDN) rows are not counted as data: a
    VDN site trained with the virtual rows' moments pooled with the real rows' (weights ``mix`` and ``1 - mix``),
    so its new statistics are that same pooling with the real part over every batch (with ``mix=1``, the
    virtual rows' statistics at the current weights), not the real data's alone, which the layers after it were
    not trained with.

    Population statistics are not always what a sampled network was trained with: a sample of strongly
    correlated values (a small FS patch) has a variance well below the population's, and the layers after it
    learned that scale.  Check a recalibrated model on held-out data (docs/statistics.md: after ``fs-patch``
    training, recalibration dropped the digits nets to 32-68%).

    It runs under ``no_grad`` and restores every module's mode and momentum; parameters,
    ``num_batches_tracked``, the sampling step counters, the virtual samples and the global RNG are left as
    they were.  If the data runs out before ``num_batches`` it uses what there was, says so in a warning and
    in the result.  On an error nothing is written.

    Args:
        model: a plain model or one returned by :func:`fxbns.transform`.
        batches: an iterable of input tensors, or of tuples/lists whose first element is the input (a
            ``DataLoader``); inputs are moved to the model's device.
        num_batches: batches to use at most (200, as detectron2's PreciseBN hook).
        progress: show a progress bar on stderr.

    Returns:
        A :class:`RecalibrationResult`: per site the old and new statistics and their relative change;
        ``print`` shows it as a table.

    >>> import torch, fxbns
    >>> m = fxbns.transform(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)), "bs")
    >>> r = fxbns.recalibrate(m, [torch.randn(8, 3, 10, 10) for _ in range(3)], num_batches=3)
    >>> r.batches, r.sites[0].count
    (3, 1536)
    """
    _check_num_batches(num_batches, "recalibrate")
    moments: dict[int, tuple[_SiteRef, _Moments]] = {}
    vmoments: dict[int, tuple[VirtualDataset, _Moments]] = {}  # VDN sites: their virtual rows' moments
    rows = [0]

    def consume_virtual(site: _SiteRef, mod: nn.Module, n_real: int, xv: torch.Tensor) -> None:
        spec = mod.active_estimator(n_real) if hasattr(mod, "active_estimator") else None
        if isinstance(spec, VirtualDataset) and xv.dim() >= 2:
            key = id(site.running_mean) if site.running_mean is not None else id(site)
            if key not in vmoments:
                vmoments[key] = (spec, _Moments())
            vmoments[key][1].add(xv)

    def consume(site: _SiteRef, x: torch.Tensor) -> None:
        if x.dim() < 2:
            return
        key = id(site.running_mean) if site.running_mean is not None else id(site)
        if key not in moments:
            moments[key] = (site, _Moments())
        moments[key][1].add(x)

    def inputs():
        for i, b in enumerate(itertools.islice(batches, num_batches)):
            x = _input_of(b, "recalibrate", i)
            rows[0] += int(x.shape[0])
            yield x

    state = _ModelState(model)
    bar = _Progress(num_batches, "recalibrate", progress)
    written = False
    try:
        with torch.random.fork_rng(devices=_rng_devices(model)):
            state.prepare()
            try:
                n, functional, snapshots = _run(model, inputs(), consume, "recalibrate", bar, consume_virtual)
            finally:
                bar.close()
        if n == 0:
            raise ValueError("recalibrate: `batches` yielded no batches; give an iterable of input tensors (or of "
                             "(input, target) pairs), e.g. the training DataLoader")
        state.restore()
        for t, saved in snapshots:
            t.copy_(saved)
        sites: list[SiteRecalibration] = []
        skipped: dict[str, str] = {}
        for site, mom in moments.values():
            if site.running_mean is None or site.running_var is None:
                skipped[site.name] = "no running statistics (track_running_stats=False)"
                continue
            if mom.mean is None:
                skipped[site.name] = "only virtual rows reached it"
                continue
            old_m = site.running_mean.detach().clone()
            old_v = site.running_var.detach().clone()
            new_m = mom.mean
            new_v = mom.m2 / max(mom.n - 1, 1)
            key = id(site.running_mean)
            if key in vmoments:  # a VDN site: the population form of the estimator it trained with
                new_m, new_v = _vdn_population(vmoments[key][0], mom, vmoments[key][1])
            site.running_mean.copy_(new_m.to(site.running_mean.dtype))
            site.running_var.copy_(new_v.to(site.running_var.dtype))
            written = True
            om, ov = old_m.double().cpu(), old_v.double().cpu()
            nm, nv = new_m.cpu(), new_v.cpu()
            eps = float(getattr(site.module, "eps", 1e-5) or 1e-5)
            shift = float(((nm - om).pow(2) / (nv + eps)).mean().sqrt())
            change = float(((nv - ov) / (ov + eps)).pow(2).mean().sqrt())
            sites.append(SiteRecalibration(site.name, site.kind, int(nm.numel()), int(mom.n), old_m.cpu(),
                                           old_v.cpu(), nm.to(old_m.dtype), nv.to(old_v.dtype), shift, change))
        seen = {s.name for s in sites} | set(skipped)
        for name, m in model.named_modules():
            if isinstance(m, _BatchNorm) and name not in seen:
                skipped[name] = ("no running statistics (track_running_stats=False)" if m.running_mean is None
                                 else "not called in the training forward")
    except BaseException:
        if not written:
            state.restore()
        raise
    if n < num_batches:
        warnings.warn(f"recalibrate: the data ran out after {n} of the {num_batches} batches asked for; the "
                      f"statistics use those {n} batches ({rows[0]} samples)", UserWarning, stacklevel=3)
    return RecalibrationResult(sites, n, num_batches, rows[0], skipped)


# ---------------------------------------------------------------------------------------------------------------
# calibrate
# ---------------------------------------------------------------------------------------------------------------

#: Candidate sample sizes: BS ratios of the batch, FS ratios of the feature map's area.
BS_RATIOS = (1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32)
FS_AREAS = (1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64, 1 / 128, 1 / 256)
FS_LAYOUTS = ("band", "grid", "patch")


#: Offsets at which a window mean is taken, at most (evenly spaced over the offsets the sampler can draw): the
#: mean over them of a smooth function of the offset is the mean over all offsets to well under the model's error.
MAX_OFFSETS = 64


def _cumsum0(f: torch.Tensor, dim: int) -> torch.Tensor:
    cs = torch.cumsum(f, dim)
    return torch.cat([torch.zeros_like(cs.narrow(dim, 0, 1)), cs], dim)


def _spread(count: int, limit: int, device) -> torch.Tensor:
    """At most ``limit`` evenly spaced integers of ``range(count)``, from 0."""
    step, cnt = _steps(count, limit)
    return torch.arange(cnt, device=device) * step


class _Maps:
    """One field's maps (R, C, *spatial) and the running sums its window means are read from, made once."""

    def __init__(self, f: torch.Tensor) -> None:
        self.f = f
        self._box: torch.Tensor | None = None
        self._flat: torch.Tensor | None = None

    def box(self) -> torch.Tensor:
        """Cumulative sums along every spatial dim, with a zero row in front (an integral image), float64."""
        if self._box is None:
            t = self.f.to(torch.float64)
            for dim in range(2, t.dim()):
                t = _cumsum0(t, dim)
            self._box = t
        return self._box

    def flat(self) -> torch.Tensor:
        """Cumulative sums along the flattened map (row-major), with a zero in front, float64."""
        if self._flat is None:
            self._flat = _cumsum0(self.f.flatten(2).to(torch.float64), 2)
        return self._flat


def _steps(count: int, limit: int) -> tuple[int, int]:
    """(step, how many): offsets ``0, step, 2 step, ...`` spread over ``range(count)``, at most ``limit``."""
    step = -(-count // limit)
    return step, -(-count // step)


def _window_means(maps: _Maps, layout: str, geom: tuple[int, ...], starts: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """The sample mean in every row and channel, for offsets the sampler can draw: (R, C, offsets), float64.
    The layouts as :class:`~fxbns.FeatureSampling` defines them: a patch is a window at any position; a grid
    takes ``p`` points ``s // p`` apart along each dim, at an offset below ``s // p`` (all such offsets); a
    band is a run of the map flattened in row-major order (``starts``: where; default: spread over all).
    Patches and shared bands are read at up to :data:`MAX_OFFSETS` evenly spaced offsets, from running sums
    (strided views: no copies)."""
    f = maps.f
    if layout == "band":
        n = geom[0]
        cs = maps.flat()
        if starts is not None:
            return (cs[..., starts + n] - cs[..., starts]) / n
        step, cnt = _steps(cs.shape[-1] - n, MAX_OFFSETS)
        span = step * (cnt - 1) + 1
        return (cs[..., n:n + span:step] - cs[..., 0:span:step]) / n
    k = math.prod(geom)
    if layout == "grid":
        out = f
        for d, p in enumerate(geom):
            dim, s = 2 + d, f.shape[2 + d]
            st = s // p
            out = out.narrow(dim, 0, st * p).unflatten(dim, (p, st)).sum(dim)
        return out.flatten(2).to(torch.float64) / k
    box = maps.box()
    nd = len(geom)
    limit = max(2, int(round(MAX_OFFSETS ** (1 / nd))))
    cuts = []
    for d, p in enumerate(geom):
        step, cnt = _steps(f.shape[2 + d] - p + 1, limit)
        span = step * (cnt - 1) + 1
        cuts.append((slice(0, span, step), slice(p, p + span, step)))  # the window's low and high edges
    out = None
    for corner in itertools.product((0, 1), repeat=nd):  # inclusion-exclusion over the window's corners
        c = box[(slice(None), slice(None)) + tuple(cuts[d][bit] for d, bit in enumerate(corner))]
        if (nd - sum(corner)) % 2:
            out = -c if out is None else out - c
        else:
            out = c if out is None else out + c
    return out.flatten(2) / k


@dataclass(frozen=True)
class _Probe:
    """One sampling geometry on a site's map: ``layout``, ``geom`` (points per dim, or band length) and, for a
    band with per-sample offsets, the sampler's plan (``K`` bands ``D`` apart at a shared shift in [0, slack])."""

    layout: str
    geom: tuple[int, ...]
    plan: tuple[int, int, int] | None = None


def _probe_moments(maps: _Maps, probe: _Probe) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel, summed over the rows: (mean over the draws of the squared sample mean, square of the sample
    mean averaged over the draws) for shared-offset draws; for a per-sample band plan (mean over the rows'
    draws of the squared band mean, mean over draws of the squared mean of the K bands of a draw)."""
    if probe.plan is None:
        wm = _window_means(maps, probe.layout, probe.geom)
        return wm.pow(2).mean(-1).sum(0), wm.mean(-1).pow(2).sum(0)
    k, d, slack = probe.plan
    dev = maps.f.device
    # draws: the K bands of a draw cover the map, so the more bands, the fewer draws are needed
    draws = max(2, min(MAX_OFFSETS // 4, 4 * MAX_OFFSETS // k))
    idx = (_spread(slack + 1, draws, dev)[:, None] + d * torch.arange(k, device=dev)[None])
    sel = _window_means(maps, "band", probe.geom, idx.flatten()).unflatten(-1, idx.shape)  # (R, C, draws, K)
    return sel.pow(2).mean((-1, -2)).sum(0), sel.mean(-1).pow(2).mean(-1).sum(0)


@dataclass(frozen=True)
class _Candidate:
    spec: Any
    count: int  # elements per channel the sample reduces
    probe: _Probe | None  # None: BS
    rows: int = 0  # BS: rows taken


def _candidates(shape: tuple[int, ...], min_elements: int) -> list[_Candidate]:
    """Every BS and FS candidate that reduces fewer elements than the whole batch, one per distinct sample."""
    n, spatial = shape[0], tuple(shape[2:])
    size = math.prod(spatial)
    total = n * size
    out: list[_Candidate] = []
    seen: set = set()
    for r in BS_RATIOS:
        spec = BatchSampling(ratio=r, min_elements=min_elements)
        m = spec.sample_count(n)
        if m < n and ("bs", m) not in seen:
            seen.add(("bs", m))
            out.append(_Candidate(spec, m * size, None, m))
    if not spatial:
        return out
    for a in FS_AREAS:
        for layout in FS_LAYOUTS:
            for per_sample in (True, False):
                spec = FeatureSampling(area_ratio=a, layout=layout, per_sample=per_sample, min_elements=min_elements)
                if layout == "band":
                    length = spec.band_length(spatial)
                    if length >= size:
                        continue
                    plan = band_plan(n, size, length, spatial[-1]) if per_sample else None
                    if plan is not None and plan[0] == 1:
                        plan = None  # one band per draw: the same sample as a shared offset
                    probe = _Probe("band", (length,), plan)
                    k = length
                else:
                    pts = spec.points(spatial)
                    if pts == spatial:
                        continue
                    probe = _Probe(layout, pts)
                    k = math.prod(pts)
                key = (probe, per_sample)
                if key in seen or n * k >= total:
                    continue
                seen.add(key)
                out.append(_Candidate(spec, n * k, probe))
    return out


class _FieldStats:
    """Accumulated moments of one field of a site (the activations, or their squared deviations from the batch
    mean) over the calibration batches, per channel."""

    def __init__(self) -> None:
        self.g_sum: torch.Tensor | None = None  # sum over rows of the row's deviation from its own mean
        self.g: torch.Tensor | None = None  # the common map (expected deviation at each position)
        self.sb2 = 0.0  # sum over calls of the between-row (unbiased) variance of the row means
        self.e2 = 0.0  # sum over rows of the mean square of e (deviation from row mean and common map)
        self.lag = 0.0  # sum over rows of the lag-1 products of e (mean over the map's last one or two dims)


class _SiteStats:
    def __init__(self, name: str, shape: tuple[int, ...]) -> None:
        self.name = name
        self.shape = shape
        self.rows = 0
        self.calls = 0
        self.var = 0.0  # sum over calls of the batch's (biased) variance per channel
        self.fields = {"mean": _FieldStats(), "var": _FieldStats()}
        self.candidates: list[_Candidate] = []
        self.bad_shape: tuple[int, ...] | None = None
        # per sampling geometry, both fields' channels stacked (activations, then squared deviations): sums over
        # the rows read of the two window moments (_probe_moments), and the same of the common maps
        self.probes: dict[_Probe, list] = {}
        self.probe_rows = 0
        self.common: dict[_Probe, tuple[torch.Tensor, torch.Tensor]] = {}


#: Rows of each calibration call whose window means are read (the rows are exchangeable; the window moments
#: are averages over rows, and this many per call, over a few calls, pin them down well past the model's error).
PROBE_ROWS = 32


def _fields(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The two fields whose sample means are the statistics: the activations, their squared deviations."""
    dims = [0] + list(range(2, x.dim()))
    xd = x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    mean = xd.mean(dims, keepdim=True)
    return {"mean": xd, "var": (xd - mean).pow(2)}


def _row_dev(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row means (R, C), deviations of each row from its own mean)."""
    if f.dim() == 2:
        return f, torch.zeros_like(f)
    b = f.mean(list(range(2, f.dim())))
    return b, f - b.reshape(b.shape + (1,) * (f.dim() - 2))


def _lag1(e: torch.Tensor) -> torch.Tensor:
    """Sum over rows of the mean lag-1 product along the last (and second last) spatial dim, per channel."""
    parts = []
    for dim in range(max(2, e.dim() - 2), e.dim()):
        s = e.shape[dim]
        if s > 1:
            parts.append((e.narrow(dim, 1, s - 1) * e.narrow(dim, 0, s - 1)).mean(list(range(2, e.dim()))).sum(0))
    return sum(parts) / len(parts) if parts else torch.zeros(e.shape[1], dtype=e.dtype, device=e.device)


def _pass1(st: _SiteStats, x: torch.Tensor) -> None:
    st.rows += x.shape[0]
    st.calls += 1
    for key, f in _fields(x).items():
        _, d = _row_dev(f)
        fs = st.fields[key]
        s = d.sum(0).double()
        fs.g_sum = s if fs.g_sum is None else fs.g_sum + s


def _pass2(st: _SiteStats, x: torch.Tensor) -> None:
    dims = [0] + list(range(2, x.dim()))
    st.var = st.var + x.detach().to(torch.float64).var(dims, unbiased=False)
    es = []
    for key, f in _fields(x).items():
        fs = st.fields[key]
        b, d = _row_dev(f)
        fs.sb2 = fs.sb2 + b.double().var(0, unbiased=True)
        if x.dim() == 2:
            continue
        e = d - fs.g.to(d.dtype)
        fs.e2 = fs.e2 + e.pow(2).mean(list(range(2, e.dim()))).double().sum(0)
        fs.lag = fs.lag + _lag1(e).double()
        es.append(e[:PROBE_ROWS])
    if not es:
        return
    maps = _Maps(torch.cat(es, 1))
    st.probe_rows += maps.f.shape[0]
    for c in st.candidates:
        if c.probe is not None and c.probe not in st.probes:
            st.probes[c.probe] = [0.0, 0.0]
    for probe, acc in st.probes.items():
        a, b2 = _probe_moments(maps, probe)
        acc[0] = acc[0] + a
        acc[1] = acc[1] + b2


def _predict(st: _SiteStats, c: _Candidate, key: str) -> torch.Tensor:
    """Predicted mean squared error, per channel, of the sample's estimate of the batch mean of field ``key``
    (the activations' mean, or their variance), in the field's units squared."""
    n = st.shape[0]
    fs = st.fields[key]
    calls = max(st.calls, 1)
    if c.probe is None:
        return (fs.sb2 / calls) * (1.0 / c.rows - 1.0 / n)
    nc = st.rows  # rows behind the common map
    ch = st.shape[1]
    part = slice(0, ch) if key == "mean" else slice(ch, 2 * ch)
    w_sum, u_sum = st.probes[c.probe]
    w, u = w_sum[part] / st.probe_rows, u_sum[part] / st.probe_rows  # per row
    if c.probe not in st.common:
        g = torch.cat([st.fields["mean"].g, st.fields["var"].g], 0)
        st.common[c.probe] = _probe_moments(_Maps(g[None]), c.probe)
    gw, gu = (t[part] for t in st.common[c.probe])
    if c.probe.plan is not None:  # per-sample band: the K bands of a draw spread over the map
        # e-term from the mean square of single bands (w); common-map term over the K bands of a draw (u)
        common = gu - u / nc
    elif c.spec.per_sample:  # independent offsets per row
        common = gw / n + (1 - 1 / n) * gu - (w / n + (1 - 1 / n) * u) / nc
    else:  # one offset for the batch
        common = gw - w / nc
    return common.clamp_min(0) + w / n


def _rms(mse: torch.Tensor, norm: torch.Tensor, valid: torch.Tensor) -> float:
    return float((mse[valid] / norm[valid]).mean().clamp_min(0).sqrt())


@dataclass
class CalibrationResult:
    """What :func:`calibrate` measured and chose.

    ``policy``: a :class:`~fxbns.Policy` naming every site's choice (``transform`` takes it; ``save``/``load``
    keep it).  ``table``: one dict per site: ``name``, ``shape``, the measured figures (``between``: share of
    the variance between samples; ``positional``: share in the map common to all samples; ``rho1``: within-map
    correlation at lag 1), the chosen ``spec`` (``None``: exact), ``sample`` (elements per channel),
    ``fraction``, the predicted ``mean_error`` and ``var_error``, ``n_eff`` (independent values the sample is
    worth, for the mean), ``reason`` and every ``candidates`` prediction.
    """

    policy: Policy
    table: list[dict[str, Any]]
    target_error: float
    batches: int
    batch_shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        def conv(v):
            if hasattr(v, "kind") and hasattr(v, "describe"):
                return spec_to_dict(v)
            if isinstance(v, dict):
                return {k: conv(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [conv(x) for x in v]
            return v
        return {"target_error": self.target_error, "batches": self.batches, "batch_shape": list(self.batch_shape),
                "policy": self.policy.to_dict(), "sites": conv(self.table)}

    @property
    def mean_fraction(self) -> float:
        """Mean over the calibrated sites of the fraction of elements their statistics use (exact: 1)."""
        rows = [r for r in self.table if r["fraction"] is not None]
        return sum(r["fraction"] for r in rows) / len(rows) if rows else 1.0

    def __str__(self) -> str:
        cols = ["name", "shape", "between", "positional", "rho(1)", "chosen", "sample", "error mean/var"]
        rows = []
        for r in self.table:
            shape = "x".join(map(str, r["shape"])) if r["shape"] else "?"
            chosen = r["spec"].describe() if r["spec"] is not None else "exact"
            sample = "-" if r["sample"] is None else f"{r['sample']} ({100 * r['fraction']:.1f}%)"
            err = "-" if r["mean_error"] is None else f"{r['mean_error']:.3f}/{r['var_error']:.3f}"
            figs = ["-" if r.get(k) is None else f"{r[k]:.2f}" for k in ("between", "positional", "rho1")]
            rows.append([r["name"], shape, *figs, chosen, sample, err])
        lines = _table(cols, rows)
        n_s = sum(1 for r in self.table if r["spec"] is not None)
        lines.append(f"{len(self.table)} BatchNorm sites: {n_s} sampled, {len(self.table) - n_s} exact; mean sample "
                     f"fraction {self.mean_fraction:.3f}; target error {self.target_error:g} (RMS relative error of "
                     f"the batch mean, in std, and variance); {self.batches} batches of "
                     f"{'x'.join(map(str, self.batch_shape))}")
        for r in self.table:
            if r["spec"] is None and r.get("reason"):
                lines.append(f"exact: {r['name']}: {r['reason']}")
        return "\n".join(lines)

    __repr__ = __str__


def _known_sites(model: nn.Module) -> list[str] | None:
    """The site names ``transform`` uses for this model (its report's, or a dry run's)."""
    info = getattr(model, "_fxbns", None)
    if info is not None:
        return [s.name for s in info.sites]
    try:
        from .api import explain
        return [r["name"] for r in explain(model, Policy(Exact())).rows]
    except Exception:  # noqa: BLE001 - names are checked when they can be; the policy is still usable
        return None


#: :func:`calibrate`'s default ``target_error``.  In ``examples/train_parity.py`` (3 seeds, 12 epochs, both digits
#: nets, docs/statistics.md) it trained within 0.3 points of exact BatchNorm at 0.025-0.030 of the elements, under
#: half the fs preset's 1/16; a target of 0.05 trained no better (-0.30 / +0.15 points against -0.22 / +0.15) at
#: 0.10-0.14 of them.  The fs preset itself runs at predicted errors of about 0.1.
DEFAULT_TARGET_ERROR = 0.1


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Any], target_error: float = DEFAULT_TARGET_ERROR,
              num_batches: int = 4, progress: bool = False, *, min_elements: int = 0) -> CalibrationResult:
    """Choose each BatchNorm site's sample from the measured correlation of its features: the cheapest BS or FS
    sample whose predicted error meets ``target_error``; a site where none does stays exact.

    **What is predicted.**  For a batch of ``N`` rows with maps of ``M`` positions, the error of a sample's
    estimate of the batch mean of a channel, in units of the channel's std, and the relative error of its
    variance estimate (the mean of the squared deviations ``(x - mean)^2``, the same model applied to that
    field), as root mean squares over the sampler's random draws and over channels.  A candidate qualifies
    when both are at most ``target_error``.  Candidates: BS at ratios 1/2 to 1/32 of the batch, FS band, grid
    and patch at 1/2 to 1/256 of the map, each with and without per-sample offsets.  "Cheapest": the fewest
    elements reduced per channel.

    **The model** (the variance of an average of correlated values, i.e. its effective sample size).  Write
    a row's map as ``x_ip = b_i + g_p + e_ip``: ``b_i`` the row's mean, ``g_p`` a map common to all rows (the
    expected deviation at position ``p``: a centred digit, a sky at the top), ``e_ip`` the rest, independent
    across rows and spatially correlated within a map.  Then

    - BS, ``m`` whole rows of ``N``: error^2 = S_b^2 (1/m - 1/N) (``S_b^2``: variance of the row means); the
      maps' inner structure cancels, so correlated maps count once each.
    - FS, ``k`` points in every row: error^2 = W / N + G, where ``W`` is the variance of one row's sample mean
      of ``e``, ``(1/k^2) sum_{p,q in sample} Cov(e_p, e_q)``, the within-map autocovariance summed over the
      sample's pairs (``k / n_eff`` times ``Var(e)/k``), and ``G`` is the common map's share: the mean over
      draws of the squared sample mean of ``g`` (one offset for the batch); that divided by ``N`` plus the
      squared mean over draws (independent per-sample offsets); the squared mean over the ``K`` bands of a draw
      (per-sample bands, spread over the map).  The between-row term is absent: every row is in the sample.

    ``W`` and ``G`` are computed from the calibration rows for every offset the sampler can draw (window means
    by cumulative sums), so edges, zero padding and a position-dependent variance are taken as measured;
    ``g`` is the rows' mean map, its noise (``W`` over the number of rows) subtracted.  The table reports the
    figures behind the choice: the between-sample share ``S_b^2 / var``, the common map's share, the lag-1
    within-map correlation of ``e``, and the chosen sample's ``n_eff = 1 / (error^2 + 1/(N M))``.

    **Assumed, and where it fails.**  Rows are exchangeable (a shuffled batch): a batch ordered by class or
    source makes BS blocks biased, which the model does not see.  The calibration batches look like training
    batches (same batch size and input size; the prediction is for that ``N`` and map size) and the features
    stay alike as training moves the weights: calibrate again after large changes (e.g. from random weights
    to trained).  Few rows (under ~16 per batch) or few batches make ``S_b`` and ``g`` noisy.  The variance's
    error neglects the second-order term ``(mean_hat - mean)^2`` (under 3% of it at errors below 0.1).  It
    predicts the error of one step's statistics, not its effect on accuracy or on the running statistics.

    The model runs in training mode on the batches (hooks, ``no_grad``); its state is left as it was (as in
    :func:`recalibrate`, which writes the running statistics; this writes nothing).

    Args:
        model: a plain model or one returned by :func:`fxbns.transform` (its policy's sites are calibrated;
            transform the original model with the result).
        batches: input tensors, or tuples/lists whose first element is the input, all of one shape (the
            training batch size and input size).
        target_error: the largest RMS error allowed, for the mean (in std) and the variance (relative); the
            default, :data:`DEFAULT_TARGET_ERROR`, is 0.1.
        num_batches: batches to use at most (each runs twice: once for the common map, once for the rest).
        progress: show a progress bar on stderr.
        min_elements: set on every chosen spec (layers below it run exact at run time: the per-device speed
            rule, e.g. 2**19 as the ``fs`` preset); sites already below it at the calibration shape stay exact.

    Returns:
        A :class:`CalibrationResult` (``.policy``, ``.table``, ``to_dict()``; prints as a table).

    >>> import torch, fxbns
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8))
    >>> batches = [torch.randn(32, 3, 32, 32) for _ in range(2)]
    >>> r = fxbns.calibrate(m, batches, target_error=0.1)
    >>> r.table[0]["spec"].kind
    'fs'
    >>> gm = fxbns.transform(m, r.policy)
    """
    if not isinstance(target_error, (int, float)) or isinstance(target_error, bool) or not 0 < target_error <= 1:
        raise ValueError(f"calibrate: target_error must be a number in (0, 1] (e.g. 0.05); got {target_error!r}")
    _check_num_batches(num_batches, "calibrate")
    if not isinstance(min_elements, int) or isinstance(min_elements, bool) or min_elements < 0:
        raise ValueError(f"calibrate: min_elements must be an integer >= 0; got {min_elements!r}")
    inputs: list[torch.Tensor] = []
    for i, b in enumerate(itertools.islice(batches, num_batches)):
        x = _input_of(b, "calibrate", i)
        if inputs and tuple(x.shape) != tuple(inputs[0].shape):
            raise ValueError(f"calibrate: batches must all have one shape (the training batch size and input size); "
                             f"batch 0 is {tuple(inputs[0].shape)}, batch {i} is {tuple(x.shape)}")
        if x.dim() < 1 or x.shape[0] < 2:
            raise ValueError(f"calibrate: batch {i} has shape {tuple(x.shape)}: give batches of at least 2 samples "
                             f"along dim 0 (the training batch size), the between-sample variance is measured")
        inputs.append(x)
    if not inputs:
        raise ValueError("calibrate: `batches` yielded no batches; give a few input tensors (or (input, target) "
                         "pairs) of the training batch size, e.g. from the training DataLoader")
    sites: dict[str, _SiteStats] = {}
    phase = [1]

    def consume(site: _SiteRef, x: torch.Tensor) -> None:
        shape = tuple(x.shape)
        st = sites.get(site.name)
        if phase[0] == 1:
            if st is None:
                sites[site.name] = st = _SiteStats(site.name, shape)
            if shape != st.shape:
                st.bad_shape = shape
                return
            if x.dim() < 2 or x.shape[0] < 2:
                st.bad_shape = shape
                return
            _pass1(st, x)
        elif st is not None and st.bad_shape is None and shape == st.shape:
            _pass2(st, x)

    state = _ModelState(model)
    bar = _Progress(2 * len(inputs), "calibrate", progress)
    try:
        with torch.random.fork_rng(devices=_rng_devices(model)):
            rng = torch.get_rng_state()
            cuda_rng = [torch.cuda.get_rng_state(d) for d in _rng_devices(model)]
            state.prepare()
            _run(model, inputs, consume, "calibrate", bar)
            for st in sites.values():
                for fs in st.fields.values():
                    if fs.g_sum is not None:
                        fs.g = fs.g_sum / st.rows
                st.candidates = _candidates(st.shape, min_elements) if st.bad_shape is None else []
            state.restore()  # the second pass sees the same samples and dropout masks as the first
            state.prepare()
            torch.set_rng_state(rng)
            for d, s in zip(_rng_devices(model), cuda_rng):
                torch.cuda.set_rng_state(s, d)
            phase[0] = 2
            _run(model, inputs, consume, "calibrate", bar)
    finally:
        state.restore()
        bar.close()
    known = _known_sites(model)
    info = getattr(model, "_fxbns", None)
    policy = Policy(Exact(), seed=info.policy.seed if info is not None else 0)
    table = [_choose(st, target_error, min_elements, known) for st in sites.values()]
    for r in table:
        if r.pop("_in_policy"):
            policy.set_module_name(r["name"], r["spec"] if r["spec"] is not None else Exact())
    return CalibrationResult(policy, table, float(target_error), len(inputs), tuple(inputs[0].shape))


def _choose(st: _SiteStats, target: float, min_elements: int, known: list[str] | None) -> dict[str, Any]:
    shape = st.shape
    n = shape[0]
    total = n * math.prod(shape[2:])
    row: dict[str, Any] = {"name": st.name, "shape": list(shape), "between": None, "positional": None, "rho1": None,
                           "spec": None, "sample": None, "fraction": None, "mean_error": None, "var_error": None,
                           "n_eff": None, "reason": None, "candidates": [],
                           "_in_policy": known is None or st.name in known}
    if known is not None and st.name not in known:
        row["reason"] = "not a site fxbns.transform finds in this model (left out of the policy)"
    if st.bad_shape is not None:
        row["reason"] = f"called with inputs of several shapes ({shape} and {st.bad_shape}) or one sample: left exact"
        return row
    var = st.var / max(st.calls, 1)
    valid = var > var.max() * 1e-12
    if not bool(valid.any()):
        row["reason"] = "constant input (no variance to estimate): left exact"
        return row
    mean_f = st.fields["mean"]
    row["between"] = float((mean_f.sb2 / st.calls / var)[valid].mean())
    if len(shape) > 2:
        e2 = mean_f.e2 / st.rows
        gp = mean_f.g.pow(2).mean(list(range(1, mean_f.g.dim()))) - e2 / st.rows
        row["positional"] = float((gp.clamp_min(0) / var)[valid].mean())
        row["rho1"] = float((mean_f.lag / mean_f.e2.clamp_min(1e-300))[valid].mean())
    else:
        row["positional"] = 0.0
    if min_elements and layer_size(shape) < min_elements:
        row["reason"] = row["reason"] or f"below min_elements {min_elements} (runs exact): left exact"
        return row
    best = None
    for c in st.candidates:
        em = _rms(_predict(st, c, "mean"), var, valid)
        ev = _rms(_predict(st, c, "var"), var.pow(2), valid)
        row["candidates"].append({"spec": c.spec, "sample": c.count, "fraction": c.count / total,
                                  "mean_error": em, "var_error": ev})
        if em <= target and ev <= target:
            key = (c.count, max(em, ev))
            if best is None or key < best[0]:
                best = (key, c, em, ev)
    if best is None:
        row["reason"] = row["reason"] or (f"no candidate meets the target {target:g}: left exact" if st.candidates
                                          else "no sample smaller than the batch: left exact")
        return row
    _, c, em, ev = best
    row.update(spec=c.spec, sample=c.count, fraction=c.count / total, mean_error=em, var_error=ev,
               n_eff=1.0 / (em * em + 1.0 / total))
    return row
