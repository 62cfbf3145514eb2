"""Eager CPU path: the sampled batch norm on aten's fused CPU batch-norm kernels.

Used on the CPU only (:func:`fxbns.ops.dispatch.choose_path`), for fp32/fp64 inputs with weight and running
statistics in the input's dtype, where it measured faster than the reference in whole training steps
(``python tools/bench.py train``; docs/benchmarks.md).  Every aten call here is valid on the CPU:

- ``native_batch_norm_backward`` with ``train=False`` and no ``save_mean``/``save_invstd``: the CPU kernel
  (``batch_norm_backward_cpu_template`` in ``aten/src/ATen/native/Normalization.cpp``) then takes the mean and
  variance from its ``running_mean``/``running_var`` arguments.  (CUDA's asserts ``save_mean->defined()`` outside
  its fused NCHW branch: this file never runs there.)
- ``native_batch_norm_backward`` with ``train=True`` gets the sample's ``save_mean``/``save_invstd``.
- ``native_batch_norm`` in eval mode fed ``(scale, shift, mean, variance 1, eps 0)`` computes
  ``scale * (x - mean) + shift``: the affine map the forward and the sampled backward need, in one vectorised pass.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..sampling import Group, gather, scatter_add_
from .reference import dense_memory_format, update_running_stats

_bn_backward = torch.ops.aten.native_batch_norm_backward.default


def _takes_view(g: Group) -> bool:
    """The group's sample is a view of the tensor (no index tensors): take it again instead of keeping it."""
    return g.view is not None or (g.rows is None and g.pos is None)


def _retake(t: torch.Tensor, geom, g: Group) -> torch.Tensor:
    """The sample of ``t`` (x, dy or dx): the view recorded in the forward when ``t`` has x's strides,
    else the group's own view or gather."""
    if geom is not None and t.stride() == geom[3]:
        return t.as_strided(geom[0], geom[1], t.storage_offset() + geom[2])
    return gather(t, g)


class _FusedSampledBatchNorm(torch.autograd.Function):
    """One sample group in float32/float64: each step is one fused aten kernel.

    forward:  the sample's mean and invstd, and the running statistics updated with the sample's n/(n-1)
              (the training-mode batch-norm op on a copied sample, else ``batch_norm_update_stats``, see
              ``_sample_stats``), then the eval-mode batch-norm kernel on the whole input fed
              ``gamma * invstd``, variance 1 and eps 0;
    backward: the eval-mode batch-norm backward (``dx = gamma * invstd * dy`` and both full sums in one
              kernel), then the statistics' term on the sample, in place; or with ``sample_backward`` the
              training-mode kernel on the sample alone for its two sums, and BatchNorm's backward formula fed
              those sums on every element (one eval-mode pass over x and one ``addcmul_`` with dy).
    When the sample is a strided view (drawn on the host), nothing is gathered or scattered.  The backward
    keeps ``x``, as native batch norm does (with ``sample_backward`` also a copy of the sample).  ``plan``
    (:func:`fused_plan`) and ``goff`` (the view's element offset): the eager module's cached path.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, group, eps, sample_backward, running_mean, running_var, momentum, stats_out,
                plan=None, goff=0):
        if plan is not None:  # a cached plan (fused_plan): the view at element offset goff of x, no checks
            vshape, vstride, xstride, copy_fmt, native_stats, ones, static = plan
            xs = x.as_strided(vshape, vstride, x.storage_offset() + goff)
            xd = xs.clone(memory_format=copy_fmt) if copy_fmt is not None else xs
            if native_stats:
                mean, invstd = torch.native_batch_norm(xd, None, None, running_mean, running_var, True, momentum,
                                                       eps)[1:]
            else:
                mean, invstd = _sample_stats(xd, running_mean, running_var, momentum, eps, True)[:2]
            geom = (vshape, vstride, goff, xstride)
        else:
            xs = gather(x, group)
            xd = _dense_sample(xs)
            copied = xd.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
            if sample_backward and not copied:
                # the backward keeps only this small copy, not x; a dense NCHW one (a plain clone of a band view
                # keeps its permuted strides, which aten's batch-norm kernels read through their slow loop)
                xd = xd.clone(memory_format=torch.contiguous_format)
                copied = True
            mean, invstd, var = _sample_stats(xd, running_mean, running_var, momentum, eps,
                                              stats_out is not None or not copied)
            if stats_out is not None:
                stats_out += (mean, var)
            static = _static_cfg(x, xs, xd, group, sample_backward)
            ones = _ones(x.shape[1], mean)
            # where the sample sits inside x, to take the same view of dy and dx when they have x's strides
            geom = ((xs.shape, xs.stride(), xs.storage_offset() - x.storage_offset(), x.stride())
                    if _takes_view(group) else None)
        # gamma * invstd once, here: the eval-mode kernel fed (gi, variance 1, eps 0) computes the same
        # gamma * (x - mean) * invstd + beta, and the backward needs gi and invstd, not the variance
        gi = invstd * weight if weight is not None else invstd
        y = torch.native_batch_norm(x, gi, bias, mean, ones, False, 0.0, 0.0)[0]
        # everything the backward needs that does not depend on dy, in one tuple (attribute access costs)
        ctx.cfg = (group, eps, sample_backward, geom, static)
        # x, as native BN keeps; with sample_backward also the dense copy of the sample
        ctx.save_for_backward(x, xd if sample_backward else None, weight, mean, invstd, gi)
        return y

    @staticmethod
    def backward(ctx, dy):
        # Inside a training step every op here runs with cold caches (the convolutions between batch norms
        # evict them): the first call of each kind costs 10-50 us against 2-5 us hot, later calls of the same
        # kind far less.  So the backward runs few kinds of ops: the statistics' invstd and gamma * invstd come
        # from the forward, gi's broadcast view is an as_strided like the sample's, the scalings are muls.
        xx, xd, weight, mean, invstd, gi = ctx.saved_tensors
        g, eps, sb, geom, (fmt, k, scale, bs, gshape, tiny_cl, xfmt) = ctx.cfg
        is_view = geom is not None
        if not dy.is_contiguous(memory_format=fmt):
            dy = dy.contiguous(memory_format=fmt)
        if sb:
            w = weight if weight is not None else torch.ones_like(mean)
            # dy's sample in the dense copy's layout (aten's batch-norm backward falls back to a slow loop when
            # the two differ)
            dys = _retake(dy, geom, g)
            if not dys.is_contiguous(memory_format=xfmt):
                dys = dys.contiguous(memory_format=xfmt)
            # the training-mode kernel on the sample: sum_S(dy * xhat) and sum_S(dy)
            sum_dyx, sum_dy = _bn_backward(dys, xd, w, None, None, mean, invstd, True, eps, [False, True, True])[1:]
            # BatchNorm's backward fed the sample's sums, on every element:
            #   dx = gi * dy + B * (x - mean) + A,   B = -gi * invstd * sum_S(dy * xhat) / m,  A = -gi * sum_S(dy) / m
            c = gi * _const(k, gi)
            ones = _ones(mean.shape[0], mean)
            dx = torch.native_batch_norm(xx, c * sum_dyx * invstd, c * sum_dy, mean, ones, False, 0.0, 0.0)[0]
            dx.addcmul_(dy, gi.as_strided(*gshape))
            sc = _const(scale, sum_dy)
            sum_dyx = sum_dyx * sc
            sum_dy = sum_dy * sc
        else:
            xs = _retake(xx, geom, g)
            # the eval-mode kernel fed (gi, mean, variance 1, eps 0): dx = gi * dy, sum(dy), and
            # sum(dy * (x - mean)), which times invstd is sum(dy * xhat)
            ones = _ones(mean.shape[0], mean)
            if tiny_cl is not None:
                dx, sum_dxm, sum_dy = _bn_backward(dy.contiguous(memory_format=tiny_cl),
                                                   xx.contiguous(memory_format=tiny_cl), gi, mean, ones, None, None,
                                                   False, 0.0, [True, True, True])
                dx = dx.contiguous()
            else:
                dx, sum_dxm, sum_dy = _bn_backward(dy, xx, gi, mean, ones, None, None, False, 0.0, [True, True, True])
            sum_dyx = sum_dxm * invstd
            # the statistics' term, sampled elements only:
            #   -gi/n * (sum_dy + xhat * sum_dyx) = (x - mean) * (invstd * c * sum_dyx) + c * sum_dy,  c = -gi/n
            c = gi * _const(k, gi)
            B = c * sum_dyx * invstd
            cb = c * sum_dy
            if _dense(xs):  # the eval-mode batch-norm kernel computes exactly this, fast on dense memory
                term = torch.native_batch_norm(xs, B, cb, mean, ones, False, 0.0, 0.0)[0]
            else:  # a strided view (a band of x): broadcast arithmetic reads it faster than that kernel
                A = (cb - B * mean).view(bs)
                if is_view and xs.shape[-1] > 1:
                    # in place on dx's band, no temporary: 2x faster than a temporary and an add on runs of 16
                    # and more (32x96x32x32, runs of 64: 95 us against 175 us), even on runs of 4; slower on
                    # single elements (4x4 maps), which keep the temporary
                    _retake(dx, geom, g).addcmul_(xs, B.view(bs)).add_(A)
                    term = None
                else:
                    term = torch.addcmul(A, xs, B.view(bs))
            if term is not None:  # (None: already added in place)
                if is_view:
                    _retake(dx, geom, g).add_(term)
                else:
                    scatter_add_(dx, g, term)
        return (dx, sum_dyx if (weight is not None and ctx.needs_input_grad[1]) else None,
                sum_dy if ctx.needs_input_grad[2] else None, None, None, None, None, None, None, None, None, None)


def _static_cfg(x: torch.Tensor, xs: torch.Tensor, xd: torch.Tensor, group: Group, sample_backward: bool) -> tuple:
    """What the backward needs that depends only on the shapes and layouts (cached in a plan)."""
    c, nd = x.shape[1], x.ndim
    return (dense_memory_format(x), -1.0 / group.count, (x.numel() // c) / group.count, (1, c) + (1,) * (xs.ndim - 2),
            # gi as a (1, C, 1, ...) broadcast view (as_strided: the op the backward has just run, see backward)
            ((1, c) + (1,) * (nd - 2), (c, 1) + (1,) * (nd - 2)),
            # tiny maps (<= 2x2): aten's NCHW batch-norm backward is ~6x slower there than its channels-last
            # kernel, even counting the two layout copies
            (torch.channels_last if nd == 4 else torch.channels_last_3d)
            if nd in (4, 5) and x.numel() // (x.shape[0] * c) < 8 and x.is_contiguous() else None,
            dense_memory_format(xd) if sample_backward else None)


class FusedPlan(NamedTuple):
    """What :class:`_FusedSampledBatchNorm` works out from an input's shape and layout alone (:func:`fused_plan`)."""

    view_shape: torch.Size  # the sample as a view of x: its shape and strides (its offset comes per step)
    view_stride: tuple[int, ...]
    x_stride: tuple[int, ...]  # the input's strides the plan was made for
    copy_format: torch.memory_format | None  # the layout the sample is copied into (None: used as the view)
    native_stats: bool  # moments and invstd from the training-mode batch-norm op on the copy
    ones: torch.Tensor  # (C,) ones: the variance fed to the eval-mode op with gamma * invstd
    static: tuple  # the backward's shape-only constants (_static_cfg)


def fused_plan(x: torch.Tensor, group: Group, sample_backward: bool) -> FusedPlan | None:
    """For a host-drawn view group on a dense ``x``: what :class:`_FusedSampledBatchNorm` works out from the
    shapes and layouts alone, to cache per input shape (the eager module does).  Inside a training step each
    tensor-metadata call costs ~10 us and each op 20-50 us (cold caches), so the cached path skips them: given
    the plan and the view's element offset, the forward takes the view, copies it, runs the two batch-norm ops.
    ``None`` where the plan does not apply (index samples, strided inputs)."""
    if group.view is None or group.shift is None or not _dense(x) or group.count <= 1:
        return None
    xs = gather(x, group)
    xd = _dense_sample(xs)
    shares = xd.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    if sample_backward:
        copy_fmt = torch.contiguous_format if shares else dense_memory_format(xd)
    else:
        copy_fmt = None if shares else dense_memory_format(xd)
    if copy_fmt is not None:  # the copy the op will make (its layout is what the backward reads)
        xd = xs.clone(memory_format=copy_fmt)
    return FusedPlan(xs.shape, xs.stride(), x.stride(), copy_fmt, copy_fmt is not None and _native_stats(xd),
                     _ones(x.shape[1], x), _static_cfg(x, xs, xd, group, sample_backward))


def _dense(t: torch.Tensor) -> bool:
    """Dense NCHW (or any contiguous) or dense channels-last: the layouts aten's batch-norm kernels are fast on."""
    return t.is_contiguous() or (t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last))


_CONSTS: dict = {}


def _const(value: float, like: torch.Tensor, shape: tuple[int, ...] = ()) -> torch.Tensor:
    """``value`` as a cached tensor of ``shape`` (0-d by default) and ``like``'s dtype and device (read-only:
    never modify it)."""
    key = (value, shape, like.dtype, like.device)
    t = _CONSTS.get(key)
    if t is None:
        if len(_CONSTS) > 4096:
            _CONSTS.clear()
        t = _CONSTS[key] = torch.full(shape, value, dtype=like.dtype, device=like.device)
    return t


def _ones(c: int, like: torch.Tensor) -> torch.Tensor:
    """A cached ``(c,)`` tensor of ones (the variance fed to the eval-mode kernel with ``gamma * invstd``)."""
    return _const(1.0, like, (c,))


#: Samples of at least this many elements (NCHW, maps of 8 or more) take their moments from two reductions.
#: Below it aten's statistics kernel is the faster: one call against about ten (hot, 2**16 elements: 70 us
#: against 105; 2**17: 129 against 120; 2**18: 252 against 163), and inside a training step, where each extra
#: call costs 10-20 us with cold caches, the ten calls took 250-370 us on 2**16-2**17 samples (resnet50
#: 16x3x64x64) where the one call took 50-75 us on 2**14.
SUMS_MIN_NUMEL = 1 << 18


def _update_stats(xd: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                  momentum: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased var) of the dense sample ``xd`` per channel; the running statistics updated in place
    (unbiased with the sample's count), as ``torch.batch_norm_update_stats`` does.

    On a large NCHW sample, aten's batch-norm statistics kernel is slow here (3.05 ms for 8x512x28x28 on a
    2-core CPU, where a plain sum takes 0.20 ms: ``python tools/bench.py kernels``), so the moments come
    from reductions instead: the mean from a sum, then the sum of squared deviations ``d = x - mean``
    from the batch-norm backward kernel's weight-gradient sum (``dy = input = d``, statistics ``(0, 1)``,
    ``eps = 0``): 1.17 ms in all, and as accurate as aten's (two passes, no cancellation; relative error
    of the variance about 1e-7 in float32 even at mean/std = 1000, against float64: tested).
    """
    c = xd.shape[1]
    n = xd.numel() // c
    if xd.numel() < SUMS_MIN_NUMEL or not xd.is_contiguous() or n // xd.shape[0] < 8:
        return torch.batch_norm_update_stats(xd, running_mean, running_var, momentum)
    mean = xd.sum([0] + list(range(2, xd.ndim))).div_(n)
    d = xd - mean.view((1, c) + (1,) * (xd.ndim - 2))
    var = _bn_backward(d, d, None, torch.zeros_like(mean), torch.ones_like(mean), None, None, False, 0.0,
                       [False, True, False])[1].div_(n)
    del d
    if running_mean is not None:
        update_running_stats(running_mean, running_var, mean, var, n, momentum)
    return mean, var


def _native_stats(xd: torch.Tensor) -> bool:
    """Whether :func:`_sample_stats` takes a copied sample's moments from the training-mode batch-norm op."""
    c = xd.shape[1]
    return xd.numel() // c > 1 and (xd.numel() < SUMS_MIN_NUMEL or not xd.is_contiguous()
                                    or xd.numel() // (c * xd.shape[0]) < 8)


def _sample_stats(xd: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                  momentum: float, eps: float, need_var: bool):
    """(mean, invstd, biased var or None) of the dense sample ``xd`` per channel, updating the running
    statistics in place as :func:`_update_stats` does.  Where that would call aten's statistics kernel on a
    sample copied out of x, the training-mode batch-norm op on it runs the same kernel and also returns invstd
    (the normalised copy it writes is small and the sample still in cache): one op where ``rsqrt(var + eps)``
    took two more (each 20-50 us with the cold caches of a training step).  ``need_var``: the variance is wanted
    too, or the sample is a view of x (where that op's extra write, and its slow loop on strided views, cost
    more: mobilenet_v2's 32x96x32x32 band 2.5 -> 3.0 ms forward in a step): then via _update_stats."""
    if not need_var and _native_stats(xd):
        _, mean, invstd = torch.native_batch_norm(xd, None, None, running_mean, running_var, True, momentum, eps)
        return mean, invstd, None
    mean, var = _update_stats(xd, running_mean, running_var, momentum)
    return mean, torch.rsqrt(var + _const(eps, var)), var


def _dense_sample(s: torch.Tensor) -> torch.Tensor:
    """The sample in a layout aten's batch-norm reduction kernels are fast on.

    Their fast paths need a dense NCHW or channels-last tensor; on other strides they fall back to a
    per-channel loop.  A strided view with long inner runs along the map (NCHW bands) is read fast enough
    there; otherwise a copy of the (small) sample is cheaper than the slow loop: measured with
    ``python tools/bench.py kernels`` and the layer benchmark.
    """
    if _dense(s):
        return s
    if s.stride(-1) == 1 and s.shape[-1] >= 16:
        return s
    # a channels-last copy: aten's channels-last statistics kernel is 2-3x faster than its NCHW one on these
    # samples, and the copy itself reads short runs faster (FS band on 7x7 to 14x14 maps: 2-11% per layer,
    # fwd+bwd, against an NCHW copy)
    if s.ndim == 4:
        return s.contiguous(memory_format=torch.channels_last)
    return s.contiguous()


def fused_batch_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, group: Group,
                     eps: float, sample_backward: bool, running_mean: torch.Tensor | None,
                     running_var: torch.Tensor | None, momentum: float, stats_out: list | None = None
                     ) -> torch.Tensor:
    """:func:`fxbns.ops.sampled_batch_norm` for one group in float32/float64 on the CPU, also updating the running statistics
    in place when given (``momentum`` as in ``nn.BatchNorm``, a float; unbiased by the sample count).

    Returns the output only; ``stats_out``, a list, receives ``(mean, biased var)`` (detached) when given.
    """
    if not x.is_contiguous():
        x = x.contiguous(memory_format=dense_memory_format(x))
    return _FusedSampledBatchNorm.apply(x, weight, bias, group, eps, sample_backward, running_mean, running_var,
                                        momentum, stats_out)
