"""Where the samples are: device-side, counter-based random draws and sample index construction.

Everything here is tensor arithmetic on the input's device.  Random offsets come from a
counter-based hash of ``(seed, step)`` (the layer's seed and its step counter, a device tensor), so:
the same seed and step give the same sample on every device; drawing never synchronises host and
device (no ``.item()``, no host copies); and it runs unchanged under ``torch.compile`` and on meta
tensors.

A sample is a list of :class:`Group` s.  Each group covers a block of rows ``[start, start+length)``
(real rows or virtual rows) and says which elements of it are taken:

- ``rows``: whole rows (``index_select`` along dim 0);
- ``pos``: flat positions in every feature map, shared by all rows or one set per row;
- neither: the whole block.

>>> import torch
>>> from fxbns.estimators import FeatureSampling
>>> g = build_groups(FeatureSampling(patch=(2, 2)), (8, 3, 6, 6), 8, 0, torch.tensor(0), seed=1)
>>> [tuple(gather(torch.randn(8, 3, 6, 6), x).shape) for x in g]
[(8, 3, 2, 2)]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .estimators import BatchSampling, Exact, FeatureSampling, VirtualDataset

_M = 2147483647  # 2**31 - 1


def random_ints(step: torch.Tensor, seed: int, count: int) -> torch.Tensor:
    """``count`` pseudo-random int64 values in ``[0, 2**31 - 1)`` from ``(seed, step)``, on ``step``'s device.

    A counter-based generator (a keyed integer hash): no state, no host round trip, reproducible.
    All intermediate values stay below 2**48, so int64 never overflows.
    """
    key = (seed * 69621 + 12345) % _M
    h = (step.to(torch.int64) % _M) * 48271 % _M
    h = (h + key) % _M
    i = torch.arange(count, device=step.device, dtype=torch.int64)
    h = (h + i * 40014) % _M
    for _ in range(2):
        h = (h * 48271 + 11) % _M
        h = torch.bitwise_xor(h, torch.bitwise_right_shift(h, 9))
    return h


@dataclass
class Group:
    """One part of a sample: rows ``[start, start+length)`` and which of their elements are taken.

    ``rows`` (m,): whole rows; ``pos`` (P,) or (length, P): flat positions in every feature map
    (shared by all rows, or one set per row); neither: the whole block.  Gathered samples have the
    channel dim at 1: (m, C, ...) for rows, (length, C, P) for positions.
    """

    start: int
    length: int
    weight: float  # weight of this group's moments in the pooled statistics (weights sum to 1)
    count: int  # elements per channel taken
    rows: torch.Tensor | None = None
    pos: torch.Tensor | None = None


def _block(x: torch.Tensor, g: Group) -> torch.Tensor:
    if g.start == 0 and g.length == x.shape[0]:
        return x
    return x.narrow(0, g.start, g.length)


def _channels_last(t: torch.Tensor) -> bool:
    return t.ndim >= 3 and t.stride(1) == 1 and t.shape[1] > 1 and not t.is_contiguous()


def _flat(b: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A *view* of block ``b`` as (n, C, S) or, for channels-last memory, (n, S, C)."""
    n, c = b.shape[0], b.shape[1]
    if _channels_last(b):
        v = b.movedim(1, -1)
        return v.view(n, -1, c), True
    return b.view(n, c, -1), False


def gather(x: torch.Tensor, g: Group) -> torch.Tensor:
    """The sampled elements of ``x`` for group ``g``, channel dim 1 (``x`` itself for a whole-tensor group)."""
    b = _block(x, g)
    if g.rows is not None:
        return b.index_select(0, g.rows)
    if g.pos is None:
        return b
    v, cl = _flat(b)
    sdim = 1 if cl else 2  # the flat spatial dim of the view
    if g.pos.ndim == 1:
        out = v.index_select(sdim, g.pos)
    else:
        idx = g.pos.unsqueeze(2).expand(-1, -1, v.shape[2]) if cl else g.pos.unsqueeze(1).expand(-1, v.shape[1], -1)
        out = torch.gather(v, sdim, idx)
    return out.transpose(1, 2) if cl else out


def scatter_add_(dx: torch.Tensor, g: Group, values: torch.Tensor) -> None:
    """``dx[sample of g] += values`` in place; ``values`` laid out as :func:`gather` returns them."""
    b = _block(dx, g)
    values = values.to(dx.dtype)
    if g.rows is not None:
        b.index_add_(0, g.rows, values)
        return
    if g.pos is None:
        b.add_(values)
        return
    v, cl = _flat(b)
    if cl:
        values = values.transpose(1, 2)
    if g.pos.ndim == 1:
        v.index_add_(1 if cl else 2, g.pos, values)
    elif cl:
        v.scatter_add_(1, g.pos.unsqueeze(2).expand(-1, -1, v.shape[2]), values)
    else:
        v.scatter_add_(2, g.pos.unsqueeze(1).expand(-1, v.shape[1], -1), values)


def _bs_group(spec: BatchSampling, start: int, n: int, elems_per_row: int, step: torch.Tensor,
              seed: int, weight: float) -> Group:
    m = spec.sample_count(n)
    if m >= n:
        return Group(start, n, weight, n * elems_per_row)
    if spec.draw == "block":
        off = random_ints(step, seed, 1) % n
        rows = (off + torch.arange(m, device=step.device)) % n
    else:
        rows = torch.argsort(random_ints(step, seed, n))[:m]
    return Group(start, n, weight, m * elems_per_row, rows=rows)


def _positions(layout: str, size: int, pts: int, off: torch.Tensor) -> torch.Tensor:
    """Positions along one dim: ``off`` has shape (...,); result (..., pts)."""
    ar = torch.arange(pts, device=off.device)
    if layout == "patch":
        return off.unsqueeze(-1) + ar
    return off.unsqueeze(-1) + (size // pts) * ar


def _offset_range(layout: str, size: int, pts: int) -> int:
    return size - pts + 1 if layout == "patch" else size // pts


def fs_fallback(spec: FeatureSampling) -> BatchSampling:
    """The batch sampling FS falls back to on (N, C) inputs, which have no feature map to sample."""
    ratio = spec.area_ratio if spec.area_ratio is not None else 0.125
    return BatchSampling(ratio=ratio, sample_backward=spec.sample_backward)


def _fs_group(spec: FeatureSampling, shape: tuple[int, ...], start: int, n: int, step: torch.Tensor,
              seed: int, weight: float) -> Group:
    spatial = tuple(shape[2:])
    if not spatial:
        return _bs_group(fs_fallback(spec), start, n, 1, step, seed, weight)
    pts = spec.points(spatial)
    count_per_row = math.prod(pts)
    if pts == spatial:
        return Group(start, n, weight, n * count_per_row)
    k = len(spatial)
    ranges = [_offset_range(spec.layout, s, p) for s, p in zip(spatial, pts)]
    rows = n if spec.per_sample else 1
    r = random_ints(step, seed, rows * k).reshape(rows, k)
    flat = None
    stride = 1
    for d in reversed(range(k)):  # flat position = sum_d pos_d * stride_d, row-major
        pos = _positions(spec.layout, spatial[d], pts[d], r[:, d] % ranges[d])  # (rows, p_d)
        shape_d = [rows] + [1] * k
        shape_d[d + 1] = pts[d]
        term = pos.reshape(shape_d) * stride
        flat = term if flat is None else flat + term
        stride *= spatial[d]
    flat = flat.reshape(rows, count_per_row)
    return Group(start, n, weight, n * count_per_row, pos=flat if spec.per_sample else flat[0])


def _real_group(spec, shape, n_real, step, seed, weight) -> Group:
    elems = math.prod(shape[2:])
    if isinstance(spec, BatchSampling):
        return _bs_group(spec, 0, n_real, elems, step, seed, weight)
    if isinstance(spec, FeatureSampling):
        return _fs_group(spec, shape, 0, n_real, step, seed, weight)
    return Group(0, n_real, weight, n_real * elems)  # all real rows


def build_groups(spec, shape: tuple[int, ...], n_real: int, n_virtual: int, step: torch.Tensor,
                 seed: int) -> list[Group]:
    """The sample for one training forward of a site with estimator ``spec`` on an input of ``shape``.

    Rows ``[0, n_real)`` are real and ``[n_real, n_real + n_virtual)`` virtual.  Non-VDN estimators
    sample the real rows only.
    """
    if isinstance(spec, VirtualDataset):
        if n_virtual <= 0:
            raise RuntimeError(
                "a VirtualDataset (VDN) site ran without virtual rows in its input. This happens when the "
                "virtual batch could not be injected at the model input (for example a BatchNorm inside a "
                "module called outside the traced graph). Use a BS or FS estimator for this layer "
                "(Policy.set_module_name(name, ...)).")
        vg = Group(n_real, n_virtual, float(spec.mix), n_virtual * math.prod(shape[2:]))
        if spec.mix >= 1:
            return [vg]
        return [_real_group(spec.real, shape, n_real, step, seed, 1.0 - float(spec.mix)), vg]
    if isinstance(spec, (Exact, type(None))):
        return [_real_group(None, shape, n_real, step, seed, 1.0)]
    return [_real_group(spec, shape, n_real, step, seed, 1.0)]
