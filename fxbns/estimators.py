"""Estimator specs: what statistics a BatchNorm site uses in training.

Each spec is a frozen dataclass, validated when built; a bad value raises ``ValueError`` naming the
field and its allowed range.

>>> from fxbns import BatchSampling, FeatureSampling
>>> BatchSampling(ratio=0.25).sample_count(32)
8
>>> FeatureSampling(area_ratio=1 / 16).points((32, 32))
(8, 8)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "Exact",
    "BatchSampling",
    "FeatureSampling",
    "VirtualDataset",
    "MicroBatch",
    "Spec",
    "spec_to_dict",
    "spec_from_dict",
]


def _check(cond: bool, spec: str, name: str, allowed: str, value: Any) -> None:
    if not cond:
        raise ValueError(f"{spec}.{name} must be {allowed}; got {value!r}")


def _check_bool(spec: str, name: str, value: Any) -> None:
    _check(isinstance(value, bool), spec, name, "True or False", value)


def _check_min_elements(spec: str, value: Any) -> None:
    _check(value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0), spec,
           "min_elements", "None (the device's speed rule) or an integer >= 0 (0: sample every layer)", value)


def layer_size(shape: tuple[int, ...], device_type: str = "cpu") -> int:
    """The size ``min_elements`` is compared with, for an input of ``shape`` (real rows only) on a device type:
    ``N * C * max(map size, floor)``, a map of one element (1x1, or an (N, C) input) counting as 1, where
    ``floor`` is the device's :class:`~fxbns.ops.dispatch.SpeedRule` ``map_floor`` (16 on the CPU, whose
    batch-norm kernels cost per (sample, channel) plane on small maps; 1 elsewhere).

    A layer below its spec's ``min_elements`` computes exact statistics with the native kernels: on small
    layers the sampled op's fixed cost (a few small kernels and Python) exceeds what its smaller reductions
    save.  ``min_elements=None`` (the presets) takes the threshold from the device's speed rule
    (:data:`fxbns.ops.dispatch.SPEED_RULES`); an integer applies on every device.
    """
    from .ops.dispatch import speed_rule

    return speed_rule(device_type).layer_size(shape)


def _threshold(spec: Any, device_type: str) -> int:
    if spec.min_elements is not None:
        return spec.min_elements
    from .ops.dispatch import speed_rule

    return speed_rule(device_type).min_elements(spec.kind)


def _below(spec: Any, shape: tuple[int, ...], device_type: str = "cpu") -> bool:
    t = _threshold(spec, device_type)
    return t > 0 and layer_size(shape, device_type) < t


@dataclass(frozen=True)
class Exact:
    """Plain BatchNorm: statistics over the whole batch (the site is left as it is)."""

    kind = "exact"

    def describe(self) -> str:
        return "exact"


@dataclass(frozen=True)
class BatchSampling:
    """Batch Sampling (BS): statistics from ``m = clamp(ceil(ratio*N), min_samples, N)`` whole samples.

    ``draw="block"`` takes a contiguous block of rows at a random offset (a view of the batch, the faster
    draw); ``draw="random"`` takes random distinct rows.  ``sample_backward=True`` also estimates the
    backward sums (d-gamma, d-beta and the statistics' gradient terms) from the sample (eager and
    ``torch.compile``).
    ``min_elements``: below this :func:`layer_size` the layer computes exact statistics (0: always sample;
    ``None``: the threshold of the device the layer runs on, from :data:`fxbns.ops.dispatch.SPEED_RULES`, as the
    presets use).  Independently of it, a sample of fewer than
    :data:`fxbns.ops.dispatch.MIN_VALUES_PER_CHANNEL` values per channel keeps the layer exact on every device.
    """

    ratio: float = 0.125
    min_samples: int = 2
    sample_backward: bool = False
    draw: str = "block"
    min_elements: int | None = 0
    kind = "bs"

    def __post_init__(self) -> None:
        _check(isinstance(self.ratio, (int, float)) and 0 < self.ratio <= 1, "BatchSampling", "ratio",
               "a number in (0, 1]", self.ratio)
        _check(isinstance(self.min_samples, int) and not isinstance(self.min_samples, bool)
               and self.min_samples >= 1, "BatchSampling", "min_samples", "an integer >= 1", self.min_samples)
        _check_bool("BatchSampling", "sample_backward", self.sample_backward)
        _check(self.draw in ("block", "random"), "BatchSampling", "draw", "'block' or 'random'", self.draw)
        _check_min_elements("BatchSampling", self.min_elements)

    def exact_at(self, shape: tuple[int, ...], device_type: str = "cpu") -> bool:
        """Whether an input of ``shape`` (real rows) on ``device_type`` is below ``min_elements`` (the speed
        rule) and gets exact statistics."""
        return _below(self, shape, device_type)

    def exact_below_batch(self, shape: tuple[int, ...], device_type: str = "cpu") -> int:
        """The smallest batch at which an input shaped like ``shape`` (any batch) passes the speed rule on
        ``device_type``; 0 when there is no threshold.  Batches under it get exact statistics."""
        t = _threshold(self, device_type)
        if not t:
            return 0
        per_row = layer_size((1, *shape[1:]), device_type)
        return -(-t // per_row)

    def values_per_channel(self, shape: tuple[int, ...]) -> int:
        """How many values per channel the sample of an input of ``shape`` (real rows) holds."""
        return self.sample_count(shape[0]) * math.prod(shape[2:])

    def sample_count(self, n: int) -> int:
        """Rows used out of a batch of ``n``."""
        if n <= self.min_samples:
            return n
        return max(self.min_samples, min(n, math.ceil(self.ratio * n - 1e-9)))

    def describe(self) -> str:
        sb = ", sample_backward" if self.sample_backward else ""
        return f"bs(ratio={self.ratio:g}{sb}{_min_desc(self)})"


@dataclass(frozen=True)
class FeatureSampling:
    """Feature Sampling (FS): statistics from part of every feature map.

    Give ``patch=(h, w)`` (one entry per spatial dim) or ``area_ratio`` (fraction of the map).
    ``layout="patch"``: one contiguous window at a random position.  ``layout="grid"``: the same
    number of points on a strided lattice spread over the map.  ``layout="band"``: the same number of
    points as one contiguous run of the flattened map (whole rows and parts of rows, in memory order),
    the layout that is cheapest to read.  ``per_sample=True``: every sample has its own random offset
    (for ``band``: the batch's bands are spread evenly from the top of the map to the bottom, at a random
    shift).  Neither given: ``area_ratio=1/16``.  ``sample_backward``: as for :class:`BatchSampling`.
    ``min_elements``: below this :func:`layer_size` the layer computes exact statistics (0: always sample;
    ``None``: the threshold of the device the layer runs on, from :data:`fxbns.ops.dispatch.SPEED_RULES`, as the
    presets use).  Independently of it, a sample of fewer than
    :data:`fxbns.ops.dispatch.MIN_VALUES_PER_CHANNEL` values per channel keeps the layer exact on every device.
    """

    patch: tuple[int, ...] | None = None
    area_ratio: float | None = None
    layout: str = "patch"
    per_sample: bool = False
    sample_backward: bool = False
    min_elements: int | None = 0
    kind = "fs"

    def __post_init__(self) -> None:
        if self.patch is not None:
            p = (self.patch,) if isinstance(self.patch, int) else tuple(self.patch)
            _check(len(p) >= 1 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in p),
                   "FeatureSampling", "patch", "a tuple of positive integers, e.g. (4, 4)", self.patch)
            object.__setattr__(self, "patch", p)
            _check(self.area_ratio is None, "FeatureSampling", "area_ratio",
                   "None when patch is given (give one of the two)", self.area_ratio)
        elif self.area_ratio is None:
            object.__setattr__(self, "area_ratio", 1 / 16)
        if self.area_ratio is not None:
            _check(isinstance(self.area_ratio, (int, float)) and 0 < self.area_ratio <= 1, "FeatureSampling",
                   "area_ratio", "a number in (0, 1]", self.area_ratio)
        _check(self.layout in ("patch", "grid", "band"), "FeatureSampling", "layout", "'patch', 'grid' or 'band'",
               self.layout)
        _check_bool("FeatureSampling", "per_sample", self.per_sample)
        _check_bool("FeatureSampling", "sample_backward", self.sample_backward)
        _check_min_elements("FeatureSampling", self.min_elements)

    exact_at = BatchSampling.exact_at
    exact_below_batch = BatchSampling.exact_below_batch

    def values_per_channel(self, shape: tuple[int, ...]) -> int:
        """How many values per channel the sample of an input of ``shape`` (real rows) holds (an (N, C) input,
        which has no map, falls back to batch sampling: ``fxbns.sampling.fs_fallback``)."""
        spatial = tuple(shape[2:])
        if not spatial:
            ratio = self.area_ratio if self.area_ratio is not None else 0.125
            return BatchSampling(ratio=ratio).sample_count(shape[0])
        if self.layout == "band":
            return shape[0] * min(math.prod(spatial), self.band_length(spatial))
        return shape[0] * math.prod(self.points(spatial))

    def points(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        """Points taken along each spatial dim of a map of size ``spatial`` (clamped to the map)."""
        if self.patch is not None:
            p = self.patch
            if len(p) == 1 and len(spatial) > 1:
                p = p * len(spatial)
            if len(p) != len(spatial):
                raise ValueError(
                    f"FeatureSampling.patch has {len(p)} dims but the feature map has {len(spatial)} "
                    f"spatial dims {tuple(spatial)}; give one size per spatial dim")
            return tuple(min(a, s) for a, s in zip(p, spatial))
        side = self.area_ratio ** (1.0 / len(spatial))
        return tuple(max(1, min(s, math.ceil(side * s - 1e-9))) for s in spatial)

    def band_length(self, spatial: tuple[int, ...]) -> int:
        """Points per sample of the ``band`` layout on a map of size ``spatial``: the patch's area, or
        ``ceil(area_ratio * map size)``; at least 1, at most the map."""
        size = math.prod(spatial)
        if self.patch is not None:
            return math.prod(self.points(spatial))
        return max(1, min(size, math.ceil(self.area_ratio * size - 1e-9)))

    def describe(self) -> str:
        size = f"patch={self.patch}" if self.patch is not None else f"area={self.area_ratio:g}"
        ps = ", per_sample" if self.per_sample else ""
        sb = ", sample_backward" if self.sample_backward else ""
        return f"fs({self.layout}, {size}{ps}{sb}{_min_desc(self)})"


def _min_desc(spec: Any) -> str:
    if spec.min_elements is None:
        return ", device speed rule"
    return f", exact below {spec.min_elements}" if spec.min_elements else ""


Real = BatchSampling | FeatureSampling | None


@dataclass(frozen=True)
class VirtualDataset:
    """Virtual Dataset Normalization (VDN): statistics from fixed synthetic samples forwarded with the batch.

    ``mix=1.0`` uses the virtual rows alone; ``0 < mix < 1`` pools the virtual moments (weight ``mix``)
    with moments of the real rows (weight ``1 - mix``), taken by ``real`` (``None``: all real rows).
    ``distribution``: ``"normal"`` (standard normal) or ``"data"`` (per-channel mean and std of the first
    real batch).
    """

    num_samples: int = 4
    mix: float = 1.0
    distribution: str = "normal"
    seed: int = 0
    real: Real = None
    kind = "vdn"

    def __post_init__(self) -> None:
        _check(isinstance(self.num_samples, int) and not isinstance(self.num_samples, bool)
               and 1 <= self.num_samples <= 4096, "VirtualDataset", "num_samples", "an integer in [1, 4096]",
               self.num_samples)
        _check(isinstance(self.mix, (int, float)) and 0 < self.mix <= 1, "VirtualDataset", "mix",
               "a number in (0, 1]", self.mix)
        _check(self.distribution in ("normal", "data"), "VirtualDataset", "distribution",
               "'normal' or 'data'", self.distribution)
        _check(isinstance(self.seed, int) and not isinstance(self.seed, bool), "VirtualDataset", "seed",
               "an integer", self.seed)
        _check(self.real is None or isinstance(self.real, (BatchSampling, FeatureSampling)), "VirtualDataset",
               "real", "None, BatchSampling or FeatureSampling", self.real)

    def describe(self) -> str:
        real = "" if self.mix == 1 else f", mix={self.mix:g} with {'all real' if self.real is None else self.real.describe()}"
        return f"vdn(n={self.num_samples}{real})"


@dataclass(frozen=True)
class MicroBatch:
    """Policy-level micro-batch regime: at a runtime batch <= ``threshold`` every site uses ``estimator``.

    The default pools all real elements with 4 virtual samples at equal weight, so batch 1 trains.
    """

    threshold: int = 4
    estimator: VirtualDataset = field(default_factory=lambda: VirtualDataset(num_samples=4, mix=0.5))

    def __post_init__(self) -> None:
        _check(isinstance(self.threshold, int) and not isinstance(self.threshold, bool) and self.threshold >= 1,
               "MicroBatch", "threshold", "an integer >= 1", self.threshold)
        _check(isinstance(self.estimator, VirtualDataset), "MicroBatch", "estimator", "a VirtualDataset",
               self.estimator)


Spec = Exact | BatchSampling | FeatureSampling | VirtualDataset
_KINDS: dict[str, type] = {"exact": Exact, "bs": BatchSampling, "fs": FeatureSampling, "vdn": VirtualDataset,
                           "micro": MicroBatch}


def spec_to_dict(spec: Any) -> dict[str, Any] | None:
    """A JSON-able dict for a spec (``None`` stays ``None``)."""
    if spec is None:
        return None
    d: dict[str, Any] = {"kind": spec.kind if not isinstance(spec, MicroBatch) else "micro"}
    for k, v in asdict(spec).items():
        if isinstance(getattr(spec, k), (BatchSampling, FeatureSampling, VirtualDataset, Exact)):
            d[k] = spec_to_dict(getattr(spec, k))
        elif isinstance(v, tuple):
            d[k] = list(v)
        else:
            d[k] = v
    return d


def spec_from_dict(d: dict[str, Any] | None) -> Any:
    """Inverse of :func:`spec_to_dict`."""
    if d is None:
        return None
    if not isinstance(d, dict) or "kind" not in d:
        raise ValueError(f"an estimator spec must be a mapping with a 'kind' key (one of {sorted(_KINDS)}); got {d!r}")
    kind = d["kind"]
    if kind not in _KINDS:
        raise ValueError(f"unknown estimator kind {kind!r}; use one of {sorted(_KINDS)}")
    cls = _KINDS[kind]
    kw = {k: v for k, v in d.items() if k != "kind"}
    for k in ("real", "estimator"):
        if isinstance(kw.get(k), dict):
            kw[k] = spec_from_dict(kw[k])
    if "patch" in kw and isinstance(kw["patch"], list):
        kw["patch"] = tuple(kw["patch"])
    try:
        return cls(**kw)
    except TypeError as e:
        raise ValueError(f"bad fields for estimator {kind!r}: {e}") from None
