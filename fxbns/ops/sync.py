"""The sampled batch norm with statistics of the union of every rank's sample (``torch.distributed``).

Per layer and step, two collectives, as ``nn.SyncBatchNorm`` (``torch/nn/modules/_functions.py``):

- **forward, one ``all_gather`` of ``2C + 1`` values:** each rank's sample count ``n``, mean and sum of squared
  deviations ``M2`` per channel.  Chan's parallel formula combines them exactly::

      count = sum_r n_r      mean = sum_r n_r mean_r / count      M2 = sum_r M2_r + sum_r n_r (mean_r - mean)^2

  and ``var = M2 / count`` (biased).  Uneven batches and empty ranks need nothing else: a rank with no sample
  sends ``n = 0``, and the running statistics stay as they are when every rank is empty.
- **backward, one ``all_reduce`` of ``2C`` values:** the two gradient sums ``sum(dy)`` and ``sum(dy * (x - mean))``.
  Without ``sample_backward`` they are the full sums over every element of every rank, and the gradient is the
  exact gradient of the sampled-statistics function::

      dx = gamma * invstd * dy                                                    everywhere, plus on the sample
      dx = gamma * invstd * (dy - sum_dy / count - (x - mean) * invstd^2 * sum_dy_xmu / count)

  With ``sample_backward`` the sums are over the union of the samples, and every element takes the second line
  (BatchNorm's own backward fed the sample's sums, as :mod:`fxbns.ops.reference` does on one process).

Parameter gradients are each rank's own share, as ``nn.SyncBatchNorm``'s: ``DistributedDataParallel`` averages
them.  With ``sample_backward`` a rank's share is the union's sample sums times its element count over the union's
sample count, so the shares add up to the ratio estimate of the full sums.

Two implementations of the local passes, one meaning: plain torch ops (any device, ``torch.compile``, CPU with
gloo), and on CUDA the primitives :mod:`fxbns.ops.cuda` uses, under the preconditions cited there
(``batch_norm_stats`` on the sample, ``batch_norm_elemt`` for the output and for ``gamma * invstd * dy``,
``batch_norm_backward_reduce`` for the sums, ``batch_norm_backward_elemt`` with an int32 count on the device).
The combination of the ranks' moments is plain tensor arithmetic on ``(world, 2C + 1)`` values on both, so an
empty rank is handled by its zero count without reading any value on the host.

>>> import torch, torch.distributed as dist
>>> from fxbns.sampling import Group
>>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
>>> x = torch.randn(4, 3, 5, 5)
>>> y = synchronized_batch_norm(x, None, None, Group(0, 4, 1.0, 100), 1e-5)
>>> torch.allclose(y, torch.nn.functional.batch_norm(x, None, None, training=True), atol=1e-5)
True
>>> dist.destroy_process_group()
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..sampling import Group, gather, put_
from .cuda import _const
from .dispatch import choose_path
from .reference import _bshape, _normalise, _rdims, acc_dtype, dense_memory_format, update_running_stats

__all__ = ["synchronized_batch_norm"]


def _all_gather(payload: torch.Tensor, process_group: Any) -> torch.Tensor:
    """(world, len(payload)): every rank's payload, in one ``all_gather_single``."""
    world = dist.get_world_size(process_group)
    out = payload.new_empty(world * payload.numel())
    dist.all_gather_single(out, payload, group=process_group)
    return out.view(world, payload.numel())


class _SyncSampledBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, group: Group, eps, sample_backward, process_group, running_mean, running_var,
                momentum, fast):
        c, acc = x.shape[1], acc_dtype(x.dtype)
        n = group.count  # this rank's sample count per channel: a host int, known from the shapes
        xs = gather(x, group)
        if n == 0 or xs.numel() == 0:
            mean_l = x.new_zeros(c, dtype=acc)
            m2_l = x.new_zeros(c, dtype=acc)
        elif fast:
            mean_l, invstd_l = torch.batch_norm_stats(xs, eps)
            m2_l = (invstd_l.reciprocal().square() - eps) * n
        else:
            mean_l = xs.sum(_rdims(xs.ndim), dtype=acc) / n
            m2_l = (xs.to(acc) - _bshape(mean_l, xs.ndim)).square().sum(_rdims(xs.ndim))
        payload = torch.cat([_const(float(n), 1, acc, x.device), mean_l, m2_l])
        allv = _all_gather(payload, process_group)  # the forward's one collective
        counts, means, m2s = allv[:, :1], allv[:, 1:c + 1], allv[:, c + 1:]
        count = counts.sum()
        inv = count.clamp(min=1.0).reciprocal()  # every rank empty: statistics 0, running statistics unchanged
        mean = (counts * means).sum(0) * inv
        var = (m2s.sum(0) + (counts * (means - mean).square()).sum(0)) * inv
        invstd = torch.rsqrt(var + eps)
        if running_mean is not None:  # (every rank empty: a zero step, the running statistics unchanged)
            f = torch.where(count > 0, momentum, 0.0).to(running_mean.dtype)
            update_running_stats(running_mean, running_var, mean, var, count, f)
        if fast and x.numel() > 0:
            y = torch.batch_norm_elemt(x, weight, bias, mean, invstd, eps)
        else:
            y = _normalise(x, weight, bias, mean, invstd)
        ctx.cfg = (group, bool(sample_backward), process_group, fast, dense_memory_format(x))
        ctx.save_for_backward(x, weight, mean, invstd, count)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd, count = ctx.saved_tensors
        g, sb, pg, fast, fmt = ctx.cfg
        c, acc = x.shape[1], mean.dtype
        if fast:
            dy = dy.contiguous(memory_format=fmt)  # precondition 3 of fxbns/ops/cuda.py
        xs, dys = (gather(x, g), gather(dy, g)) if sb else (x, dy)  # where this rank's sums come from
        if xs.numel() == 0:
            s_dy, s_dyxmu = mean.new_zeros(c), mean.new_zeros(c)
        elif fast:
            s_dy, s_dyxmu, _, _ = torch.batch_norm_backward_reduce(dys, xs, mean, invstd, weight, True, False, False)
        else:
            red = _rdims(xs.ndim)
            s_dy = dys.sum(red, dtype=acc)
            s_dyxmu = (dys.to(acc) * (xs.to(acc) - _bshape(mean, xs.ndim))).sum(red)
        sums = torch.cat([s_dy, s_dyxmu])
        dist.all_reduce(sums, group=pg)  # the backward's one collective
        sum_dy, sum_dyxmu = sums[:c], sums[c:]
        inv = count.clamp(min=1.0).reciprocal()
        gi = invstd if weight is None else invstd * weight.to(acc)
        n_int = count.to(torch.int32).reshape(1)  # precondition 4 of fxbns/ops/cuda.py: int32 on the device

        def full_backward(d, v):  # gamma * invstd * (dy - sum_dy / count - (x - mean) * invstd^2 * sum_dy_xmu / count)
            if fast:
                return torch.batch_norm_backward_elemt(d, v, mean, invstd, weight, sum_dy, sum_dyxmu, n_int)
            nd = v.ndim
            t = d.to(acc) - _bshape(sum_dy * inv, nd) - (v.to(acc) - _bshape(mean, nd)) * _bshape(
                invstd.square() * sum_dyxmu * inv, nd)
            return (t * _bshape(gi, nd)).to(d.dtype)

        if x.numel() == 0:
            dx = torch.zeros_like(x)
        elif sb:
            dx = full_backward(dy, x)
        else:
            if fast:
                dx = torch.batch_norm_elemt(dy, weight, None, _const(0.0, c, acc, x.device), invstd, 0.0)
            else:
                dx = (dy.to(acc) * _bshape(gi, dy.ndim)).to(dy.dtype)
            if g.count > 0:
                put_(dx, g, full_backward(gather(dy, g), gather(x, g)))
        if sb:  # this rank's share of the ratio estimate of the full sums
            share = (x.numel() // c) * inv
            dw, db = sum_dyxmu * invstd * share, sum_dy * share
        else:  # this rank's own full sums
            dw, db = s_dyxmu * invstd, s_dy
        dw = dw.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        db = db.to(weight.dtype if weight is not None else acc) if ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None, None, None, None, None, None


def synchronized_batch_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, group: Group,
                            eps: float, sample_backward: bool = False, process_group: Any = None,
                            running_mean: torch.Tensor | None = None, running_var: torch.Tensor | None = None,
                            momentum=0.1, *, path: str | None = None) -> torch.Tensor:
    """Batch norm of ``x`` with statistics of the union of every rank's sample (see the module docstring).

    Every rank of ``process_group`` must call it for the same layer, in the same order (one collective in the
    forward, one in the backward); a rank with an empty batch calls it too.

    Args:
        x: this rank's input, ``(N, C, ...)`` (``N`` may be 0).
        weight, bias: ``(C,)`` affine parameters, or ``None``.
        group: this rank's sample, one :class:`~fxbns.sampling.Group` (a whole-tensor group for exact statistics).
        eps: added to the variance.
        sample_backward: take the backward's two sums from the samples instead of every element.
        process_group: the group to synchronize over (``None``: the default group).
        running_mean, running_var: updated in place with the union's mean and unbiased variance, when given.
        momentum: a float, or a 0-d tensor (the cumulative average's ``1 / num_batches_tracked``).
        path: ``"cuda"`` (SyncBatchNorm's CUDA primitives) or ``"reference"`` (plain torch ops) to force one;
            ``None``: the CUDA primitives where :func:`fxbns.ops.dispatch.choose_path` takes the CUDA path.

    Returns:
        The output, in ``x``'s dtype.
    """
    if x.ndim < 2:
        raise ValueError(f"synchronized_batch_norm: expected an (N, C, ...) input, got shape {tuple(x.shape)}")
    if path is None:
        path = "cuda" if choose_path(x, weight, 1, running_mean) == "cuda" else "reference"
    if path not in ("cuda", "reference"):
        raise ValueError(f"path must be 'cuda', 'reference' or None; got {path!r}")
    if path == "cuda" and not x.is_contiguous(memory_format=dense_memory_format(x)):
        x = x.contiguous()
    return _SyncSampledBatchNorm.apply(x, weight, bias, group, eps, sample_backward, process_group, running_mean,
                                       running_var, momentum, path == "cuda")
