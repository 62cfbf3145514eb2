"""The sampled batch norm in plain differentiable torch ops: its definition, and the oracle of every fast path.

Per channel, with the sample ``S`` pooled from groups ``k`` (weights ``w_k``, ``n_k`` values each)::

    mean = sum_k w_k mean_k(x_S)          var = sum_k w_k mean_k((x_S - mean)^2)      (fp32; fp64 for fp64)
    y    = gamma * (x - mean) * invstd + beta,   invstd = (var + eps)^-1/2            (every element)

Gradients: without ``sample_backward`` they are the exact gradients of this function (autograd through the
sample).  With it, the backward is BatchNorm's own backward formula with its two sums estimated from the sample,
applied to every element::

    dx = gamma * invstd * (dy - mean_S(dy) - xhat * mean_S(dy * xhat)),   xhat = (x - mean) * invstd
    dgamma = M * mean_S(dy * xhat),   dbeta = M * mean_S(dy)                          (M values per channel)

so the statistics' term is spread over all elements as in BatchNorm, not concentrated on the sample.

Valid on every device, dtype and layout, under autocast, ``torch.compile``, meta and FakeTensor.

>>> import torch
>>> from fxbns.sampling import Group
>>> x = torch.randn(4, 3, 5, 5)
>>> y = batch_norm(x, None, None, [Group(0, 4, 1.0, 100)], 1e-5)
>>> torch.allclose(y, torch.nn.functional.batch_norm(x, None, None, training=True), atol=1e-5)
True
"""

from __future__ import annotations

import torch

from ..sampling import Group, gather

__all__ = ["acc_dtype", "dense_memory_format", "sample_moments", "batch_norm", "update_running_stats"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are computed in: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dense_memory_format(t: torch.Tensor) -> torch.memory_format:
    """The memory format a dense tensor is laid out in: channels_last (3d) only where it is not also plain
    contiguous (a tensor contiguous in both, such as one with 1x1 maps, counts as contiguous)."""
    if t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    if t.ndim == 5 and t.is_contiguous(memory_format=torch.channels_last_3d) and not t.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def _bshape(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-channel vector as a (1, C, 1, ...) tensor that broadcasts against an (N, C, ...) one."""
    return t.reshape([1, -1] + [1] * (ndim - 2))


def _rdims(ndim: int) -> list[int]:
    return [0] + list(range(2, ndim))


def sample_moments(x: torch.Tensor, groups: list[Group]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled ``(mean, biased var)`` per channel of the sample, in the accumulation dtype, differentiable.

    Two passes over the (small) sample, the sum and then the squared deviations, so the variance keeps its
    precision when the mean is large against the spread.
    """
    acc = acc_dtype(x.dtype)
    xs = [gather(x, g).to(acc) for g in groups]
    mean = sum(s.sum(_rdims(s.ndim)) * (g.weight / g.count) for g, s in zip(groups, xs))
    var = sum((s - _bshape(mean, s.ndim)).square().sum(_rdims(s.ndim)) * (g.weight / g.count)
              for g, s in zip(groups, xs))
    return mean, var


def _normalise(x: torch.Tensor, weight, bias, mean: torch.Tensor, invstd: torch.Tensor) -> torch.Tensor:
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(invstd.dtype)
    nd = x.ndim
    return (x.to(scale.dtype) * _bshape(scale, nd) + _bshape(shift, nd)).to(x.dtype)


class _SampleBackward(torch.autograd.Function):
    """The normalisation with BatchNorm's backward formula fed the sample's sums (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, group):
        ctx.group = group
        ctx.save_for_backward(x, weight, mean, invstd)
        return _normalise(x, weight, bias, mean, invstd)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        g: Group = ctx.group
        nd = x.ndim
        acc = mean.dtype
        xs, dys = gather(x, g).to(acc), gather(dy, g).to(acc)
        xhat_s = (xs - _bshape(mean, xs.ndim)) * _bshape(invstd, xs.ndim)
        red = _rdims(xs.ndim)
        mdy = dys.sum(red) / g.count
        mdyx = (dys * xhat_s).sum(red) / g.count
        gi = invstd if weight is None else invstd * weight.to(acc)
        xhat = (x.to(acc) - _bshape(mean, nd)) * _bshape(invstd, nd)
        dx = (_bshape(gi, nd) * (dy.to(acc) - _bshape(mdy, nd) - xhat * _bshape(mdyx, nd))).to(x.dtype)
        m_full = x.numel() // x.shape[1]
        dw = (mdyx * m_full).to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        db = (mdy * m_full).to(weight.dtype if weight is not None else acc) if ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None


@torch.no_grad()
def update_running_stats(running_mean: torch.Tensor, running_var: torch.Tensor, mean: torch.Tensor,
                         var: torch.Tensor, count, momentum) -> None:
    """Move the running statistics toward ``(mean, var * n / (n - 1))`` by ``momentum`` (a float, or a tensor
    for the cumulative average), in place, as ``nn.BatchNorm`` does: unbiased with the sample's ``count`` ``n``
    (an int, or a tensor for synchronized statistics)."""
    if isinstance(count, torch.Tensor):
        unbiased = var * (count / (count - 1).clamp_min(1))
    else:
        unbiased = var * (count / (count - 1)) if count > 1 else var
    running_mean.lerp_(mean.to(running_mean.dtype), momentum)
    running_var.lerp_(unbiased.to(running_var.dtype), momentum)


def batch_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: list[Group],
               eps: float, sample_backward: bool = False, running_mean: torch.Tensor | None = None,
               running_var: torch.Tensor | None = None, momentum=0.1) -> torch.Tensor:
    """One training forward of the sampled batch norm; updates ``running_mean``/``running_var`` in place when
    given (``momentum`` a float, or a 0-d tensor for the cumulative average).

    Args:
        x: the input, (N, C, ...).
        weight, bias: the affine parameters (C,), or None.
        groups: the sample (:func:`fxbns.sampling.build_groups`).
        eps: added to the variance.
        sample_backward: estimate the backward's sums from the sample (one group only).
        running_mean, running_var, momentum: the running statistics to update, or None.
    Returns:
        The normalised output, in ``x``'s dtype.
    """
    if sample_backward and len(groups) != 1:
        raise ValueError("sample_backward needs a single sample group (it is not available with VDN mixing)")
    mean, var = sample_moments(x, groups)
    if sample_backward:
        mean, var = mean.detach(), var.detach()
        invstd = torch.rsqrt(var + eps)
        y = _SampleBackward.apply(x, weight, bias, mean, invstd, groups[0])
    else:
        y = _normalise(x, weight, bias, mean, torch.rsqrt(var + eps))
    if running_mean is not None and momentum is not None:
        update_running_stats(running_mean, running_var, mean.detach(), var.detach(), sum(g.count for g in groups),
                             momentum)
    return y
