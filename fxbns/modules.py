"""``SampledBatchNorm``: a BatchNorm whose training statistics come from a sample.

It keeps BatchNorm's parameters and buffers under the same names (``weight``, ``bias``,
``running_mean``, ``running_var``, ``num_batches_tracked``), so state dicts load both ways, and its
eval mode *is* ``nn.BatchNorm``'s eval (the same code path).

>>> import torch
>>> from fxbns import FeatureSampling, SampledBatchNorm
>>> bn = SampledBatchNorm.from_batchnorm(torch.nn.BatchNorm2d(8), FeatureSampling(patch=(4, 4)))
>>> bn(torch.randn(4, 8, 16, 16)).shape
torch.Size([4, 8, 16, 16])
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import distributed as _dist
from .estimators import BatchSampling, Exact, FeatureSampling, MicroBatch, VirtualDataset
from .ops import dispatch, sampled_batch_norm
from .ops.cpu import _FusedSampledBatchNorm, fused_plan
from .ops.dispatch import choose_path, speed_rule
from .ops.sync import synchronized_batch_norm
from .sampling import build_groups, host_draw

__all__ = ["SampledBatchNorm", "site_seed"]


def site_seed(name: str, seed: int = 0) -> int:
    """A per-layer seed derived from the layer's qualified name and a global seed."""
    return (zlib.crc32(name.encode()) + 7919 * int(seed)) % 2147483647


def rank_seed(seed: int) -> int:
    """The seed this process draws with: :func:`fxbns.distributed.rank_seed` of ``seed`` and the global rank under
    ``torch.distributed``, ``seed`` itself on a single process.  Host-side (no tensor is read)."""
    if _dist.initialized():
        return _dist.rank_seed(seed, torch.distributed.get_rank())
    return seed


def _in_backward() -> bool:
    """Whether this forward runs inside an autograd backward pass: an activation-checkpointing recompute
    (``torch.utils.checkpoint``, reentrant or not, re-runs the forward there)."""
    return torch._C._current_graph_task_id() != -1


def _host_draws_ok(x: torch.Tensor, module: nn.Module) -> bool:
    """Whether this eager call may draw its sample on the host (offsets as Python ints baked into views).
    Not under CUDA-graph capture (a replay would reuse the captured offsets forever) and not in an
    ``nn.DataParallel`` replica (replicas are rebuilt from the original every step, so a host counter never
    advances): there the sample is drawn on the device from the step counter."""
    if getattr(module, "_is_replica", False):
        return False
    return not (x.is_cuda and torch.cuda.is_current_stream_capturing())


def _one_value_error(shape) -> ValueError:
    return ValueError(f"Expected more than 1 value per channel when training, got input size {torch.Size(shape)}")


class VirtualState:
    """Shared between the virtual-batch injector and the sites it cannot pass ``n_real`` to."""

    def __init__(self) -> None:
        self.n_real: int | None = None


class SampledBatchNorm(_BatchNorm):
    """BatchNorm with sampled training statistics (BS, FS, VDN or micro-batch); exact ``nn.BatchNorm`` in eval."""

    sync = False  # synchronize the training statistics across ``process_group`` (fxbns.ops.sync)
    process_group = None  # None: the default group

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, *, estimator=None, micro: MicroBatch | None = None,
                 seed: int = 0, dims: int | None = None, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.estimator = estimator if estimator is not None else Exact()
        self.micro = micro
        self.seed = int(seed)
        self.dims = dims  # 1, 2 or 3: which nn.BatchNorm{dims}d this replaces (for revert)
        self._vstate: VirtualState | None = None
        self.register_buffer("_fxbns_step", torch.zeros((), dtype=torch.long, device=device), persistent=False)
        self._host_step = 0  # the step counter as a Python int (eager mode draws its samples on the host)
        self._exact_cache: dict = {}  # (input shape, estimator, micro) -> what this module does at that shape
        self.last_runs: str | None = None  # "sampled" or "exact": what the latest training forward did

    def _next_host_step(self) -> int | None:
        """The step counter for this training forward as a Python int, advanced; ``None`` under
        ``torch.compile``, where samples are drawn from the device counter instead.  An activation-checkpointing
        recompute gets the step of the forward it repeats, without advancing.  Compiled steps do not advance
        this host copy, so eager steps after compiled ones continue the eager sequence (valid samples, a
        different sequence) until a state dict is loaded, which re-reads the device counter."""
        if torch.compiler.is_compiling():
            return None
        s = self._host_step
        if _in_backward():
            return max(s - 1, 0)
        self.__dict__["_host_step"] = s + 1  # a plain attribute: skip nn.Module.__setattr__'s checks
        return s

    def _sync_host_step(self) -> None:
        """Re-read the host step counter from the device counter (after loading a state dict)."""
        c = self.num_batches_tracked if self.track_running_stats else self._fxbns_step
        if c is not None and c.device.type != "meta":
            self._host_step = int(c)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._sync_host_step()

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        self._host_step = 0

    @classmethod
    def from_batchnorm(cls, bn: _BatchNorm, estimator, *, micro: MicroBatch | None = None, seed: int = 0
                       ) -> SampledBatchNorm:
        """A sampled version of ``bn`` that *shares* its parameters and buffers (no copy)."""
        dims = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}.get(type(bn))
        dev = bn.running_mean.device if bn.running_mean is not None else (
            bn.weight.device if bn.weight is not None else None)
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                  estimator=estimator, micro=micro, seed=seed, dims=dims, device="meta")
        new.weight, new.bias = bn.weight, bn.bias
        new.running_mean, new.running_var = bn.running_mean, bn.running_var
        new.num_batches_tracked = bn.num_batches_tracked
        new._fxbns_step = torch.zeros((), dtype=torch.long, device=dev)
        new.training = bn.training
        new._sync_host_step()
        return new

    def to_batchnorm(self) -> _BatchNorm:
        """A plain ``nn.BatchNorm{1,2,3}d`` sharing this module's parameters and buffers; the ``nn.SyncBatchNorm``
        (with its process group) for a site that came from one."""
        args = (self.num_features, self.eps, self.momentum, self.affine, self.track_running_stats)
        if self.__dict__.get("_fxbns_from_sync"):
            bn = nn.SyncBatchNorm(*args, self.__dict__.get("process_group"), device="meta")
        else:
            cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}.get(self.dims, nn.BatchNorm2d)
            bn = cls(*args, device="meta")
        bn.weight, bn.bias = self.weight, self.bias
        bn.running_mean, bn.running_var = self.running_mean, self.running_var
        bn.num_batches_tracked = self.num_batches_tracked
        bn.training = self.training
        return bn

    def reseed(self, seed: int) -> None:
        """Set the layer's sampling seed (the same seed and step give the same samples)."""
        self.seed = int(seed)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2 or input.dim() > 5:
            raise ValueError(f"expected a 2-D to 5-D input (N, C, ...), got {input.dim()}-D")
        if self.dims == 1 and input.dim() not in (2, 3):
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")
        if self.dims == 2 and input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")
        if self.dims == 3 and input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")

    def extra_repr(self) -> str:
        micro = f", micro(<= {self.micro.threshold}: {self.micro.estimator.describe()})" if self.micro else ""
        return f"{super().extra_repr()}, estimator={self.estimator.describe()}{micro}"

    def active_estimator(self, n_real: int):
        """The estimator used for a batch of ``n_real`` real rows."""
        if self.micro is not None and n_real <= self.micro.threshold:
            return self.micro.estimator
        return self.estimator

    def _resolve(self, input: torch.Tensor, n_real: int | None):
        """(real rows, estimator) for this call; ``n_real`` falls back to the injector's shared state."""
        if n_real is None:
            vs = self._vstate
            n_real = vs.n_real if (vs is not None and vs.n_real is not None) else input.shape[0]
        return n_real, self.active_estimator(n_real)

    def forward(self, input: torch.Tensor, n_real: int | None = None) -> torch.Tensor:
        if not self.training:
            return super().forward(input)
        if self.sync and _dist.initialized():
            return sync_forward(self, input, n_real, self.weight, self.bias, self.running_mean, self.running_var,
                                self.num_batches_tracked if self.track_running_stats else None)
        if (n_real is None and self._vstate is None and not torch.compiler.is_compiling()
                and _host_draws_ok(input, self)):
            # eager, every row real: what this shape gets (exact, or the sample's geometry drawn on the host) is
            # worked out once per shape and estimator, since most of a deep model's small layers take this path and
            # its Python is per call
            cache = self.__dict__.setdefault("_exact_cache", {})  # (modules pickled by older versions lack it)
            key = (input.shape, id(self.estimator), id(self.micro))
            hit = cache.get(key)
            if hit is None or hit[0] is not self.estimator or hit[1] is not self.micro:
                self._check_input_dim(input)
                spec = self.active_estimator(input.shape[0])
                exact = exact_in_eager(spec, input)
                draw = host_draw(spec, tuple(input.shape)) if not exact and isinstance(
                    spec, (BatchSampling, FeatureSampling)) else None
                hit = (self.estimator, self.micro, exact, spec, draw, _UNPLANNED)
                cache[key] = hit
            if hit[2]:
                return self._exact_forward(input)
            if hit[4] is not None:
                s = self._next_host_step()
                group = hit[4](s, rank_seed(self.seed))
                plan = hit[5]
                if plan is _UNPLANNED:
                    plan = self._plan(input, hit[3], group)
                    cache[key] = hit = hit[:5] + (plan,)
                self.__dict__["last_runs"] = "sampled"
                recompute = _in_backward()
                dtype, sb, fp = plan if plan is not None else (None, False, None)
                if (fp is not None and not recompute and input.stride() == fp.x_stride and input.dtype == dtype
                        and self.momentum is not None):
                    # the cached plan (CPU): the view's offset from the draw, the op straight away (its Python, and
                    # the checks the general route makes, cost as much as a small layer's kernels in a step)
                    p, b = self._parameters, self._buffers
                    goff = sum(i * st for i, st in zip(group.shift, fp.x_stride))
                    y = _FusedSampledBatchNorm.apply(input, p["weight"], p["bias"], group, self.eps, sb,
                                                     b["running_mean"], b["running_var"], self.momentum, None, fp, goff)
                    b["num_batches_tracked"].add_(1)
                    return y
                track = self.track_running_stats and not recompute
                return train_forward(input, input.shape[0], hit[3], self.weight, self.bias,
                                     self.running_mean if track else None, self.running_var if track else None,
                                     self.num_batches_tracked if track else None, self._fxbns_step,
                                     self.momentum, self.eps, self.seed, s, [group], count=not recompute)
        self._check_input_dim(input)
        n_real, spec = self._resolve(input, n_real)
        if isinstance(spec, VirtualDataset) and n_real == input.shape[0]:
            # no virtual rows: called outside the model's forward (a user's method such as forward_features),
            # where no virtual batch is appended; the real rows' statistics, as the VDN spec's real part takes them
            spec = spec.real if spec.real is not None and spec.mix < 1 else Exact()
        if _exact_here(spec, input.shape, n_real, input.device.type):
            if n_real == input.shape[0]:
                return self._exact_forward(input)
            spec = Exact()
        self.__dict__["last_runs"] = "sampled" if not isinstance(spec, Exact) else "exact"
        host = self._next_host_step() if _host_draws_ok(input, self) else None
        recompute = not torch.compiler.is_compiling() and _in_backward()
        track = self.track_running_stats and not recompute
        return train_forward(input, n_real, spec, self.weight, self.bias, self.running_mean if track else None,
                             self.running_var if track else None, self.num_batches_tracked if track else None,
                             self._fxbns_step, self.momentum, self.eps, self.seed, host, count=not recompute)

    def _plan(self, input: torch.Tensor, spec, group):
        """(input dtype, sample_backward, :func:`~fxbns.ops.cpu.fused_plan`) for the cached eager CPU path, or
        ``None`` where the dispatch would not take the CPU path (see there) or the plan does not apply."""
        p, b = self._parameters, self._buffers
        rm = b.get("running_mean")
        if not (self.track_running_stats and "weight" in p and "bias" in p and b.get("num_batches_tracked") is not None
                and rm is not None and rm.device == input.device
                and choose_path(input, p["weight"], 1, rm) == "cpu"):
            return None
        sb = dispatch.sample_backward_applies(spec, group.count,
                                              input.numel() // input.shape[1])
        fp = fused_plan(input, group, sb)
        return None if fp is None else (input.dtype, sb, fp)

    def __getstate__(self):
        # the per-shape cache holds closures and tensors worked out from the shapes: not pickled (nor deep-copied),
        # rebuilt on the next call
        state = self.__dict__.copy()
        state["_exact_cache"] = {}
        return state

    def _apply(self, fn, *args, **kwargs):
        # a dtype or device change invalidates the cached per-shape plans (they hold tensors and dtypes)
        self.__dict__["_exact_cache"] = {}
        return super()._apply(fn, *args, **kwargs)

    def _exact_forward(self, input: torch.Tensor) -> torch.Tensor:
        """nn.BatchNorm's training forward (exact statistics, the same kernel), with the host step counter kept
        in step with the device counter.  In eager mode it calls the batch-norm op directly, without
        nn.BatchNorm's per-call checks; ``momentum=None`` (a cumulative average), a parametrized weight (e.g.
        ``torch.nn.utils.parametrize``, which is not in ``_parameters``) and ``torch.compile`` go through
        nn.BatchNorm's own forward.  A checkpointing recompute normalises with the batch's statistics again
        without updating the running statistics a second time."""
        if math.prod(input.shape) // input.shape[1] <= 1:
            raise _one_value_error(input.shape)
        self.__dict__["last_runs"] = "exact"
        track = self.track_running_stats
        b, p = self._buffers, self._parameters
        compiling = self._next_host_step() is None
        if not compiling and _in_backward():
            return F.batch_norm(input, None, None, self.weight, self.bias, True, 0.0, self.eps)
        if (compiling or self.momentum is None or "weight" not in p or "bias" not in p
                or "running_mean" not in b or "running_var" not in b):
            if not track:
                self._fxbns_step.add_(1)
            return super().forward(input)
        b["num_batches_tracked" if track else "_fxbns_step"].add_(1)
        args = (p["weight"], p["bias"], b["running_mean"] if track else None, b["running_var"] if track else None,
                True, self.momentum, self.eps, torch.backends.cudnn.enabled)
        if _tiny_map_rows(input):
            # the same statistics on an (N*H*W, C) copy: aten's CPU kernels pay per (sample, channel) plane on
            # maps of 2-4 elements, and treat an (M, C) input as one plane per channel (see _tiny_map_rows)
            c = input.shape[1]
            rows = input.movedim(1, -1)
            y = torch.batch_norm(rows.reshape(-1, c), *args)
            return y.view(rows.shape).movedim(-1, 1).contiguous()
        return torch.batch_norm(input, *args)


class FunctionalBatchNorm(nn.Module):
    """Stands in for an ``F.batch_norm(x, running_mean, running_var, weight, bias, ...)`` call in a graph.

    Holds no parameters (they stay where the user's code keeps them); eval mode is that same call.
    """

    sync = False  # as SampledBatchNorm's
    process_group = None

    def __init__(self, momentum: float, eps: float, estimator=None, micro: MicroBatch | None = None,
                 seed: int = 0) -> None:
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.estimator = estimator if estimator is not None else Exact()
        self.micro = micro
        self.seed = int(seed)
        self._vstate: VirtualState | None = None
        self.register_buffer("_fxbns_step", torch.zeros((), dtype=torch.long), persistent=False)
        self._host_step = 0
        self.last_runs: str | None = None

    def extra_repr(self) -> str:
        return f"estimator={self.estimator.describe()}"

    active_estimator = SampledBatchNorm.active_estimator
    _resolve = SampledBatchNorm._resolve
    _next_host_step = SampledBatchNorm._next_host_step

    def forward(self, input, running_mean=None, running_var=None, weight=None, bias=None, n_real=None):
        if not self.training:  # the original call in eval: running statistics (batch statistics if there are none)
            return F.batch_norm(input, running_mean, running_var, weight, bias, running_mean is None, self.momentum,
                                self.eps)
        if self._fxbns_step.device != input.device:  # the model moved after the transform (a one-time move)
            self._fxbns_step = self._fxbns_step.to(input.device)
        if self.sync and _dist.initialized():
            return sync_forward(self, input, n_real, weight, bias, running_mean, running_var, None)
        n_real, spec = self._resolve(input, n_real)
        recompute = not torch.compiler.is_compiling() and _in_backward()
        if recompute:
            running_mean = running_var = None
        if _exact_here(spec, input.shape, n_real, input.device.type):
            if n_real == input.shape[0]:
                self.__dict__["last_runs"] = "exact"
                self._next_host_step()
                if not recompute:
                    self._fxbns_step.add_(1)
                return F.batch_norm(input, running_mean, running_var, weight, bias, True, self.momentum, self.eps)
            spec = Exact()
        self.__dict__["last_runs"] = "sampled" if not isinstance(spec, Exact) else "exact"
        host = self._next_host_step() if _host_draws_ok(input, self) else None
        return train_forward(input, n_real, spec, weight, bias, running_mean, running_var, None, self._fxbns_step,
                             self.momentum, self.eps, self.seed, host, count=not recompute)


_UNPLANNED = object()  # a cache entry whose fused plan is not worked out yet


def _tiny_map_rows(x: torch.Tensor) -> bool:
    """Whether exact batch norm on ``x`` is faster as an ``(N*H*W, C)`` matrix (eager, dense NCHW, on a device
    whose speed rule says so: the CPU).

    aten's CPU batch-norm kernels have a cost per (sample, channel) plane, large next to a plane of 2 to 4
    elements; an (M, C) input is one strided plane per channel.  Measured on a 2-core CPU (forward and
    backward, training, the transposing copies included): 16x2048x2x2 1.43 -> 0.50 ms, 32x960x2x2 1.31 ->
    0.53 ms, 16x512x2x2 0.42 -> 0.32 ms; even at 16x256x2x2 (2**14 elements), slower below that and on
    3x3 and 4x4 maps (16x576x3x3 0.34 -> 0.38 ms, 16x1024x4x4 0.66 -> 1.12 ms).  The same arithmetic in
    another summation order (results within float rounding of nn.BatchNorm's).
    """
    return _tiny_map_shape(x.shape, x.device.type) and x.is_contiguous()


def tiny_map(shape: tuple[int, ...]) -> bool:
    """Whether an input of ``shape`` has feature maps of 2 to 4 elements."""
    return len(shape) >= 3 and 2 <= math.prod(shape[2:]) <= 4


def _tiny_map_shape(shape: tuple[int, ...], device_type: str) -> bool:
    """:func:`_tiny_map_rows` for a dense NCHW input of ``shape``."""
    rule = speed_rule(device_type)
    return rule.tiny_map_rows and math.prod(shape) >= rule.tiny_map_min_numel and tiny_map(shape)


def exact_reason(spec, shape: tuple[int, ...], device_type: str = "cpu") -> str | None:
    """Why a training call with estimator ``spec`` on an input of ``shape`` (real rows) on ``device_type`` keeps
    exact statistics, or ``None`` when it samples.  Shape ints only: known on the host, static under compile."""
    if spec is None or isinstance(spec, Exact):
        return "exact estimator"
    if not isinstance(spec, (BatchSampling, FeatureSampling)):
        return None
    if math.prod(shape) // shape[1] <= 1:
        return "one value per channel"
    if spec.exact_at(tuple(shape), device_type):
        return f"below the {'device speed rule' if spec.min_elements is None else 'min_elements'} size"
    k = dispatch.MIN_VALUES_PER_CHANNEL  # read per call: tests of the op's arithmetic on tiny samples lower it
    if spec.values_per_channel(tuple(shape)) < k:
        return f"sample under {k} values per channel"
    return None


def _exact_here(spec, shape: torch.Size, n_real: int, device_type: str = "cpu") -> bool:
    """Exact statistics for this call (:func:`exact_reason` on the real rows)."""
    return exact_reason(spec, (n_real, *shape[1:]), device_type) is not None


def exact_in_eager(spec, x: torch.Tensor | tuple[int, ...], device_type: str = "cpu") -> bool:
    """Exact statistics for an eager training call on ``x`` (every row real): :func:`exact_reason`, or, when the
    spec follows a speed rule (``min_elements`` not 0), a map of 2 to 4 elements that :func:`_tiny_map_rows`
    normalises exactly in less time than the sampled op takes on that device (in a resnet50 step at 16x3x64x64 on
    the CPU: 16x2048x2x2 0.58-0.70 ms exact against 1.05-1.25 ms with ``fs``, per-layer times from ``fxbns.tune``).
    ``torch.compile`` keeps the sampled op there (its own kernels).  ``x`` may be a shape (a dense NCHW input on
    ``device_type``)."""
    if isinstance(x, torch.Tensor):
        shape, device_type = tuple(x.shape), x.device.type
    else:
        shape = tuple(x)
    if exact_reason(spec, shape, device_type) is not None:
        return True
    if not (isinstance(spec, (BatchSampling, FeatureSampling)) and spec.min_elements != 0):
        return False
    return _tiny_map_rows(x) if isinstance(x, torch.Tensor) else _tiny_map_shape(shape, device_type)


def train_forward(input, n_real, spec, weight, bias, running_mean, running_var, num_batches_tracked, step,
                  momentum, eps, seed, host_step=None, groups=None, count: bool = True):
    """One training forward with sampled statistics, updating the running statistics in place (when given).

    ``host_step`` (the step counter as a Python int, eager mode) lets samples be drawn as strided views; under
    ``torch.compile``, CUDA-graph capture and in DataParallel replicas it is ``None`` and the sample is drawn on
    the device from the counter.  ``groups``: the sample, when the caller has drawn it
    (:func:`~fxbns.sampling.host_draw`); else drawn here.  ``count``: advance the step counter (not in a
    checkpointing recompute).  The op itself is chosen by :func:`fxbns.ops.dispatch.choose_path`.
    """
    N = input.shape[0]
    counter = num_batches_tracked if num_batches_tracked is not None else step
    if groups is None:
        groups = build_groups(spec, tuple(input.shape), n_real, N - n_real, counter, rank_seed(seed), host_step)
    sb = len(groups) == 1 and dispatch.sample_backward_applies(spec, groups[0].count,
                                                               input.numel() // input.shape[1])
    factor = momentum
    if running_mean is not None and momentum is None:  # cumulative moving average, as nn.BatchNorm
        counter.add_(1)
        factor = 1.0 / num_batches_tracked.to(running_mean.dtype)
        count = False
    y = sampled_batch_norm(input, weight, bias, groups, eps, sb, running_mean, running_var, factor)
    if count:
        counter.add_(1)  # a buffer (no grad)
    return y


def sync_forward(site: nn.Module, input: torch.Tensor, n_real: int | None, weight, bias, running_mean, running_var,
                 num_batches_tracked) -> torch.Tensor:
    """A synchronized site's training forward (``site.sync`` set, ``torch.distributed`` initialised): the
    statistics of the union of every rank's sample (:func:`fxbns.ops.sync.synchronized_batch_norm`).

    The site's own estimator applies (a synchronized site is not in the micro-batch regime: its statistics come
    from the whole group); a rank whose local batch the estimator would not sample (the speed and statistical
    rules on the local shape, or no real row) contributes its whole batch.  One value per channel raises on a
    group of one process, as ``nn.BatchNorm``; with more ranks the union holds more.
    """
    pg = site.__dict__.get("process_group")
    if site.__dict__.get("_fxbns_sync_checked", False) is not pg:  # once per group object
        _dist.check_member(pg, site.__dict__.get("_fxbns_name", ""))
        site.__dict__["_fxbns_sync_checked"] = pg
    check_dim = getattr(site, "_check_input_dim", None)
    if check_dim is not None:
        check_dim(input)
    n_real, _ = site._resolve(input, n_real)
    spec = site.estimator  # not the micro-batch regime's (see above)
    if isinstance(spec, VirtualDataset):
        raise ValueError(f"fxbns site {site.__dict__.get('_fxbns_name', '')!r} synchronizes its statistics but its "
                         f"estimator is {spec.describe()}: VirtualDataset statistics cannot be synchronized (the "
                         f"virtual rows are the same on every rank). Use exact, bs or fs for synchronized sites")
    local = (n_real, *input.shape[1:])
    if n_real == 0 or exact_reason(spec, local, input.device.type) is not None:
        spec = Exact()
    if n_real > 0 and math.prod(local) // local[1] <= 1 and torch.distributed.get_world_size(pg) == 1:
        raise _one_value_error(local)
    compiling = torch.compiler.is_compiling()
    recompute = not compiling and _in_backward()
    host = site._next_host_step() if (not compiling and _host_draws_ok(input, site)) else None
    counter = num_batches_tracked if num_batches_tracked is not None else site._fxbns_step
    groups = build_groups(spec, tuple(input.shape), n_real, input.shape[0] - n_real, counter, rank_seed(site.seed),
                          host)
    track = running_mean is not None and running_var is not None and not recompute
    factor = site.momentum
    counted = False
    if track and factor is None:  # the cumulative moving average, as nn.BatchNorm
        counter.add_(1)
        factor = 1.0 / counter.to(running_mean.dtype)
        counted = True
    y = synchronized_batch_norm(input, weight, bias, groups[0], site.eps, bool(getattr(spec, "sample_backward", False)),
                                pg, running_mean if track else None, running_var if track else None, factor)
    if not recompute and not counted:
        counter.add_(1)
    site.__dict__["last_runs"] = "exact" if isinstance(spec, Exact) else "sampled"
    return y
