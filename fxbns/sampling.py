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
- ``view``: a strided *view* of the tensor (offsets drawn on the host as Python ints), so taking the
  sample and adding into it cost no index tensors and no copies;
- none of these: the whole block.

Two ways to draw the same sample: with a Python-int step (:func:`random_ints_host`, eager mode) the
offsets are host ints and the sample is a view; with a device-tensor step (:func:`random_ints`, under
``torch.compile``) they are device tensors and the sample is gathered by index.  Both give the same
elements for the same ``(seed, step)``.

>>> import torch
>>> from fxbns.estimators import FeatureSampling
>>> x = torch.randn(8, 3, 6, 6)
>>> dev = build_groups(FeatureSampling(patch=(2, 2)), (8, 3, 6, 6), 8, 0, torch.tensor(0), seed=1)
>>> host = build_groups(FeatureSampling(patch=(2, 2)), (8, 3, 6, 6), 8, 0, torch.tensor(0), seed=1, host_step=0)
>>> tuple(gather(x, dev[0]).shape), tuple(gather(x, host[0]).shape)  # by index (positions flat), a view
((8, 3, 4), (8, 3, 2, 2))
>>> torch.equal(gather(x, dev[0]), gather(x, host[0]).flatten(2))
True
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
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
    # a running sum of one element: a copy of the counter's value *now*, through an op that the compiler's
    # forward/backward partitioner does not recompute.  The layer increments the counter in place after the
    # draw, and the partitioner (torch 2.14) may otherwise recompute this hash in the backward from the
    # already-incremented counter, i.e. from the next step's sample: silently wrong gradients (seen here;
    # pytorch/pytorch PR 197039).  Saved instead, the backward sees the forward's sample.
    step = torch.cumsum(step.to(torch.int64).reshape(1), 0)
    h = (step % _M) * 48271 % _M
    h = (h + key) % _M
    i = torch.arange(count, device=step.device, dtype=torch.int64)
    h = (h + i * 40014) % _M
    for _ in range(2):
        h = (h * 48271 + 11) % _M
        h = torch.bitwise_xor(h, torch.bitwise_right_shift(h, 9))
    return h


def random_ints_host(step: int, seed: int, count: int) -> list[int]:
    """The same values as :func:`random_ints`, computed on the host from a Python-int step (no tensors)."""
    key = (seed * 69621 + 12345) % _M
    h0 = ((step % _M) * 48271 % _M + key) % _M
    out = []
    for i in range(count):
        h = (h0 + i * 40014) % _M
        for _ in range(2):
            h = (h * 48271 + 11) % _M
            h ^= h >> 9
        out.append(h)
    return out


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
    view: Callable[[torch.Tensor], torch.Tensor] | None = None  # host-drawn sample: a strided view of the tensor
    rows_block: bool = False  # ``rows`` are consecutive (a block draw on the device)
    # host draws: the index, per dim, where ``view`` starts in a dense tensor (its storage offset is the dot product
    # of this with the tensor's strides; the band's flat offset along the maps counts as the last dim's)
    shift: tuple[int, ...] | None = None


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
    if g.view is not None:
        return g.view(x)
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
    values = values.to(dx.dtype)
    if g.view is not None:
        g.view(dx).add_(values)
        return
    b = _block(dx, g)
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


def put_(dx: torch.Tensor, g: Group, values: torch.Tensor) -> None:
    """``dx[sample of g] = values`` in place; ``values`` laid out as :func:`gather` returns them."""
    values = values.to(dx.dtype)
    if g.view is not None:
        g.view(dx).copy_(values)
        return
    b = _block(dx, g)
    if g.rows is not None:
        b.index_copy_(0, g.rows, values)
        return
    if g.pos is None:
        b.copy_(values)
        return
    v, cl = _flat(b)
    if cl:
        values = values.transpose(1, 2)
    if g.pos.ndim == 1:
        v.index_copy_(1 if cl else 2, g.pos, values)
    elif cl:
        v.scatter_(1, g.pos.unsqueeze(2).expand(-1, -1, v.shape[2]), values)
    else:
        v.scatter_(2, g.pos.unsqueeze(1).expand(-1, v.shape[1], -1), values)


def sample_mask(shape: tuple[int, ...], g: Group, device: torch.device) -> torch.Tensor:
    """Which elements group ``g`` takes from a tensor of ``shape``, as a boolean mask of shape
    ``(N, 1, *spatial)`` (the same for every channel).  Device arithmetic only, for the compiled path: there a
    masked full-size expression fuses into the kernel that writes the gradient, where a scatter into it
    would need its own pass (and atomic adds).  Host-drawn (view) groups have no mask."""
    if g.view is not None:
        raise ValueError("sample_mask: a host-drawn (view) sample has no index tensors; draw it on the device")
    n, spatial = shape[0], tuple(shape[2:])
    size = math.prod(spatial)
    bshape = (n, 1) + (1,) * len(spatial)
    if g.rows is not None and g.rows_block:
        # consecutive rows: a range test on the row index.  Nothing here is read per row from memory: a flag per
        # row (below) is read with a stride of 1 along the batch, and inductor's C++ backend then drops the 2-d
        # tiling it uses where x and dy differ in layout (a channels-last conv output, an NCHW gradient) and
        # loads dy element by element (mobilenet_v2's largest layer: backward kernel 11.8 ms, native's 9-10 ms)
        lo = g.rows[:1] + g.start
        ar = torch.arange(n, device=device)
        return ((ar >= lo) & (ar < lo + g.rows.shape[0])).view(bshape)
    if g.rows is not None:  # written into a small buffer once (a compare-and-any would be redone per element)
        return torch.zeros(n, dtype=torch.bool, device=device).index_fill(0, g.rows + g.start, True).view(bshape)
    ar = torch.arange(n, device=device)
    block = (ar >= g.start) & (ar < g.start + g.length)
    if g.pos is None:
        return block.view(bshape)
    if g.pos.ndim == 1:
        taken = torch.zeros(size, dtype=torch.bool, device=device).index_fill(0, g.pos, True)
        return (block.unsqueeze(1) & taken.unsqueeze(0)).view((n, 1) + spatial)
    taken = torch.zeros(g.length, size, dtype=torch.bool, device=device).scatter(1, g.pos, True)
    if g.length != n:
        taken = torch.cat([taken.new_zeros(g.start, size), taken, taken.new_zeros(n - g.start - g.length, size)])
    return taken.view((n, 1) + spatial)


def _bs_group(spec: BatchSampling, start: int, n: int, elems_per_row: int, step: torch.Tensor,
              seed: int, weight: float) -> Group:
    """The group drawn on the device (eager host draws: :func:`host_draw`)."""
    m = spec.sample_count(n)
    if m >= n:
        return Group(start, n, weight, n * elems_per_row)
    if spec.draw == "block":  # rows [off, off + m), off uniform in [0, n - m]
        rows = random_ints(step, seed, 1) % (n - m + 1) + torch.arange(m, device=step.device)
        return Group(start, n, weight, m * elems_per_row, rows=rows, rows_block=True)
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


def band_plan(n: int, size: int, length: int, row: int | None = None) -> tuple[int, int, int]:
    """How ``n`` rows share out band offsets on a flat map of ``size`` (rows of ``row`` elements):
    ``(K, D, slack)``.

    Rows are taken in blocks of ``K`` (a divisor of ``n``, at most ``size // length``); row ``i`` starts its
    band at ``o0 + (i % K) * D`` with ``o0`` uniform in ``[0, slack]``, so a block's bands are spread from
    the top of the map to the bottom (at ``K = size // length`` and ``D = length`` a block tiles the map).
    ``D`` is the widest spacing that fits, stepped down when that would stack bands shorter than a map row
    in the same columns (``D`` a multiple of the row length): the spacing that covers the columns most
    evenly.  ``K = 1`` (a prime ``n``, or a band of more than half the map) is a shared offset.
    """
    if torch.compiler.is_compiling():  # dynamo traces through caches; the arithmetic is cheap to trace
        return _band_plan(n, size, length, row)
    return _band_plan_cached(n, size, length, row)


def _column_unevenness(k: int, d: int, length: int, row: int) -> int:
    """max - min of how often each column of a map row is covered by ``k`` bands spaced ``d`` apart."""
    full, rest = divmod(length, row)
    diff = [0] * (row + 1)
    diff[0] += k * full  # whole rows cover every column
    diff[row] -= k * full
    for i in range(k):
        c = (i * d) % row
        end = c + rest
        diff[c] += 1
        if end <= row:
            diff[end] -= 1
        else:  # wraps into the next map row: columns [c, row) and [0, end - row)
            diff[row] -= 1
            diff[0] += 1
            diff[end - row] -= 1
    cov, acc = [], 0
    for j in range(row):
        acc += diff[j]
        cov.append(acc)
    return max(cov) - min(cov)


def _band_plan(n: int, size: int, length: int, row: int | None = None) -> tuple[int, int, int]:
    k = max(1, min(n, size // length))
    while k > 1 and n % k:
        k -= 1
    if k == 1:
        return 1, 0, size - length
    d = (size - length) // (k - 1)
    if row and 1 < row < size and length % row:
        best = min(range(d, max(length - 1, d - row), -1), key=lambda c: (_column_unevenness(k, c, length, row), -c))
        d = best
    return k, d, size - length - (k - 1) * d


_band_plan_cached = functools.lru_cache(maxsize=4096)(_band_plan)


def _dense_flat_stride(t: torch.Tensor) -> int:
    """The stride of the flattened spatial dims of a dense (N, C, *spatial) tensor (NCHW or channels-last)."""
    for d in range(2, t.ndim - 1):
        if t.shape[d + 1] != 1 and t.stride(d) != t.stride(d + 1) * t.shape[d + 1]:
            raise ValueError("the spatial dims of this tensor cannot be flattened; make it contiguous")
    return t.stride(-1) if t.ndim > 2 else 1


def _band_view(rows: int, k: int, d: int, o0: int, length: int):
    """The band sample of rows ``[0, rows)`` as one strided view: (rows // k, C, k, length), channel dim 1."""
    def view(t: torch.Tensor) -> torch.Tensor:
        sn, sc, ss = t.stride(0), t.stride(1), _dense_flat_stride(t)
        return t.as_strided((rows // k, t.shape[1], k, length), (k * sn, sc, sn + d * ss, ss),
                            t.storage_offset() + o0 * ss)
    return view


def _window_view(n: int, layout: str, offs: list[int], pts: tuple[int, ...], spatial: tuple[int, ...]):
    """A shared-offset patch or grid of rows ``[0, n)`` as a view (narrow / strided slices of each spatial dim)."""
    def view(t: torch.Tensor) -> torch.Tensor:
        idx = [slice(0, n), slice(None)]
        for o, p, s in zip(offs, pts, spatial):
            st = 1 if layout == "patch" else s // p
            idx.append(slice(o, o + (p - 1) * st + 1, st))
        return t[tuple(idx)]
    return view


def _fs_group(spec: FeatureSampling, shape: tuple[int, ...], start: int, n: int, step: torch.Tensor,
              seed: int, weight: float) -> Group:
    """The group drawn on the device (eager host draws: :func:`host_draw`)."""
    spatial = tuple(shape[2:])
    if not spatial:
        return _bs_group(fs_fallback(spec), start, n, 1, step, seed, weight)
    if spec.layout == "band":
        size = math.prod(spatial)
        length = spec.band_length(spatial)
        if length >= size:
            return Group(start, n, weight, n * size)
        if spec.per_sample:
            k, d, slack = band_plan(n, size, length, spatial[-1])
        else:
            k, d, slack = 1, 0, size - length
        o0 = random_ints(step, seed, 1) % (slack + 1)
        ar = torch.arange(length, device=step.device)
        if not spec.per_sample:
            return Group(start, n, weight, n * length, pos=o0 + ar)
        rows = torch.arange(n, device=step.device) % k
        return Group(start, n, weight, n * length, pos=(o0 + rows * d).unsqueeze(1) + ar)
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


def _bs_block_draw(n: int, m: int, weight: float, count: int, ndim: int) -> Callable[[int, int], Group]:
    rest = (0,) * (ndim - 1)

    def draw(host_step: int, seed: int) -> Group:
        off = random_ints_host(host_step, seed, 1)[0] % (n - m + 1)
        return Group(0, n, weight, count, view=lambda t: t.narrow(0, off, m), shift=(off,) + rest)
    return draw


def _band_draw(n: int, weight: float, k: int, d: int, slack: int, length: int, ndim: int
               ) -> Callable[[int, int], Group]:
    zeros = (0,) * (ndim - 1)

    def draw(host_step: int, seed: int) -> Group:
        o0 = random_ints_host(host_step, seed, 1)[0] % (slack + 1)
        return Group(0, n, weight, n * length, view=_band_view(n, k, d, o0, length), shift=zeros + (o0,))
    return draw


def _window_draw(n: int, weight: float, layout: str, ranges: list[int], pts: tuple[int, ...],
                 spatial: tuple[int, ...]) -> Callable[[int, int], Group]:
    def draw(host_step: int, seed: int) -> Group:
        r = random_ints_host(host_step, seed, len(spatial))
        offs = [v % ranges[d] for d, v in enumerate(r)]
        return Group(0, n, weight, n * math.prod(pts), view=_window_view(n, layout, offs, pts, spatial),
                     shift=(0, 0, *offs))
    return draw


def host_draw(spec, shape: tuple[int, ...], weight: float = 1.0) -> Callable[[int, int], Group] | None:
    """For a BS or FS ``spec`` whose eager sample is drawn on the host (a strided view, or the whole batch), on
    inputs of ``shape`` with every row real: ``draw(host_step, seed) -> Group``, the group
    :func:`build_groups` returns, with everything that depends on the shape alone worked out once (eager
    layers cache it per shape: the per-call Python is most of a small layer's cost).  ``None`` where the eager
    sample is drawn on the device (BS ``draw="random"``, per-sample FS patches and grids).  ``weight``: the
    group's weight in pooled statistics (VDN mixing)."""
    n, spatial = shape[0], tuple(shape[2:])
    elems = math.prod(spatial)
    if isinstance(spec, FeatureSampling) and not spatial:
        spec = fs_fallback(spec)
    if isinstance(spec, BatchSampling):
        m = spec.sample_count(n)
        if m >= n:
            g = Group(0, n, weight, n * elems)
            return lambda host_step, seed: g
        return _bs_block_draw(n, m, weight, m * elems, len(shape)) if spec.draw == "block" else None
    if not isinstance(spec, FeatureSampling):
        return None
    if spec.layout == "band":
        size = elems
        length = spec.band_length(spatial)
        if length >= size:
            g = Group(0, n, weight, n * size)
            return lambda host_step, seed: g
        k, d, slack = band_plan(n, size, length, spatial[-1]) if spec.per_sample else (1, 0, size - length)
        return _band_draw(n, weight, k, d, slack, length, len(shape))
    pts = spec.points(spatial)
    if pts == spatial:
        g = Group(0, n, weight, n * elems)
        return lambda host_step, seed: g
    if spec.per_sample:
        return None
    return _window_draw(n, weight, spec.layout, [_offset_range(spec.layout, s, p) for s, p in zip(spatial, pts)],
                        pts, spatial)


def _real_group(spec, shape, n_real, step, seed, weight, host_step=None) -> Group:
    if host_step is not None and isinstance(spec, (BatchSampling, FeatureSampling)):
        draw = host_draw(spec, (n_real, *shape[1:]), weight)
        if draw is not None:
            return draw(host_step, seed)
    elems = math.prod(shape[2:])
    if isinstance(spec, BatchSampling):
        return _bs_group(spec, 0, n_real, elems, step, seed, weight)
    if isinstance(spec, FeatureSampling):
        return _fs_group(spec, shape, 0, n_real, step, seed, weight)
    return Group(0, n_real, weight, n_real * elems)  # all real rows


def build_groups(spec, shape: tuple[int, ...], n_real: int, n_virtual: int, step: torch.Tensor,
                 seed: int, host_step: int | None = None) -> list[Group]:
    """The sample for one training forward of a site with estimator ``spec`` on an input of ``shape``.

    Rows ``[0, n_real)`` are real and ``[n_real, n_real + n_virtual)`` virtual.  Non-VDN estimators
    sample the real rows only.  ``step`` is the layer's step counter on the device; ``host_step``, when
    given, is the same counter as a Python int: samples that can be strided views (BS blocks, bands,
    shared-offset patches and grids) are then drawn on the host.  Either way the elements are the same.
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
        return [_real_group(spec.real, shape, n_real, step, seed, 1.0 - float(spec.mix), host_step), vg]
    if isinstance(spec, (Exact, type(None))):
        return [_real_group(None, shape, n_real, step, seed, 1.0)]
    return [_real_group(spec, shape, n_real, step, seed, 1.0, host_step)]
