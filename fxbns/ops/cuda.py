"""Eager CUDA path: the sampled batch norm on the primitives ``nn.SyncBatchNorm`` runs on CUDA every day.

forward:  ``batch_norm_stats`` on the sample (mean, invstd), ``batch_norm_gather_stats_with_counts`` with one
          "rank" (updates the running statistics, unbiased with the sample's count), ``batch_norm_elemt`` on the
          whole input: 3 kernels, reading x once for the output plus the small sample.
backward: without ``sample_backward``: ``batch_norm_backward_reduce`` over the whole tensor (both sums and the
          parameter gradients), ``batch_norm_elemt`` on dy for ``gamma * invstd * dy``, and on the sample alone
          ``batch_norm_backward_elemt`` with the sample's count, written over the sample: 4 kernels.
          With it: ``batch_norm_backward_reduce`` on the sample, ``batch_norm_backward_elemt`` on every element fed
          the sample's sums and count, two scalings of the parameter gradients: 4 kernels, reading dy and x once.

Preconditions, read from ``aten/src/ATen/native/cuda/Normalization.cu`` and ``Normalization.cuh`` (torch 2.x), that
:func:`fxbns.ops.dispatch.choose_path` and this file guarantee (``tests/cuda_primitives.py`` checks each on every
recorded call):

1. ``mean``/``invstd`` are in the accumulation dtype (fp32 for fp16/bf16/fp32, fp64 for fp64): they come from
   ``batch_norm_stats_cuda``, which allocates them with ``toAccumulateType(self.scalar_type(), true)``; the
   ``GenericPackedTensorAccessor<stat_accscalar_t>`` of every later kernel checks that type.
2. The weight is in the accumulation dtype or absent: ``batch_norm_backward_elemt_cuda`` reads it as
   ``accscalar_t`` whenever the input is fp16/bf16 and mean is fp32 (``is_half_float || is_bfloat16_float``), and
   the channels-last kernels read a weight of another dtype than the input as ``accscalar_t``.
3. ``dy`` and ``x`` share one dense layout: the channels-last kernels (chosen by
   ``batch_norm_use_channels_last_kernels(grad_out)`` alone in ``batch_norm_backward_elemt_cuda``) read both
   through raw pointers with the same strides ("Input is guarunteed to be channels-last compatible").  The
   backward makes ``dy`` contiguous in x's memory format, and the sample views of both have the same strides.
4. ``count`` for ``batch_norm_backward_elemt`` is an int32 tensor on the device (``count.const_data_ptr<int>()``,
   summed over its ``numel()``); ``counts`` for ``batch_norm_gather_stats_with_counts`` has the running
   statistics' dtype (its accessor is ``scalar_t`` = ``running_mean.scalar_type()``).
5. Inputs of any strides are accepted by the non-channels-last templates, which ``reshape`` the input to
   (N, C, -1) and index it through a packed accessor (strided sample views included).
6. ``save_mean``/``save_invstd`` are never passed as None: this path does not call ``native_batch_norm_backward``
   (whose CUDA implementation asserts ``save_mean->defined()`` outside its fused NCHW branch).

Counts are cached device tensors made once per (value, dtype, device), so no step copies from the host.
"""

from __future__ import annotations

import torch

from ..sampling import Group, gather, put_
from .reference import dense_memory_format

__all__ = ["batch_norm"]

_CONSTS: dict = {}


def _const(value, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A cached read-only (n,) tensor filled with ``value`` (made once, then reused: no per-step host copy)."""
    key = (value, n, dtype, device)
    t = _CONSTS.get(key)
    if t is None:
        if len(_CONSTS) > 4096:
            _CONSTS.clear()
        t = _CONSTS[key] = torch.full((n,), value, dtype=dtype, device=device)
    return t


class _CudaSampledBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, group: Group, eps, sample_backward, running_mean, running_var, momentum):
        xs = gather(x, group)
        mean, invstd = torch.batch_norm_stats(xs, eps)
        if running_mean is not None and isinstance(momentum, float):
            # one "rank" holding the sample: the running statistics updated in the same kernel (unbiased with the
            # sample's count), as SyncBatchNorm's forward does with the gathered per-rank statistics
            counts = _const(float(group.count), 1, running_mean.dtype, x.device)
            mean, invstd = torch.batch_norm_gather_stats_with_counts(
                x, mean.unsqueeze(0), invstd.unsqueeze(0), running_mean, running_var, momentum, eps, counts)
        elif running_mean is not None:  # a tensor momentum (cumulative average): the same update in tensor ops
            var = invstd.reciprocal().square_().sub_(eps)
            n = group.count
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.lerp_((var * (n / max(n - 1, 1))).to(running_var.dtype), momentum)
        y = torch.batch_norm_elemt(x, weight, bias, mean, invstd, eps)
        ctx.cfg = (group, sample_backward, dense_memory_format(x))
        ctx.save_for_backward(x, weight, mean, invstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        g, sb, fmt = ctx.cfg
        dy = dy.contiguous(memory_format=fmt)  # precondition 3
        need_w = weight is not None and ctx.needs_input_grad[1]
        need_b = weight is not None and ctx.needs_input_grad[2]
        count = _const(g.count, 1, torch.int32, x.device)  # precondition 4
        xs, dys = gather(x, g), gather(dy, g)
        if sb:
            sum_dy, sum_dy_xmu, gw, gb = torch.batch_norm_backward_reduce(dys, xs, mean, invstd, weight, True,
                                                                          need_w, need_b)
            dx = torch.batch_norm_backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count)
            scale = (x.numel() // x.shape[1]) / g.count
            gw = gw * scale if need_w else None
            gb = gb * scale if need_b else None
        else:
            sum_dy, sum_dy_xmu, gw, gb = torch.batch_norm_backward_reduce(dy, x, mean, invstd, weight, True,
                                                                          need_w, need_b)
            zeros = _const(0.0, mean.shape[0], mean.dtype, x.device)
            dx = torch.batch_norm_elemt(dy, weight, None, zeros, invstd, 0.0)  # gamma * invstd * dy
            # on the sample: gamma * invstd * (dy - sum_dy / m - (x - mean) * invstd^2 * sum_dy_xmu / m)
            put_(dx, g, torch.batch_norm_backward_elemt(dys, xs, mean, invstd, weight, sum_dy, sum_dy_xmu, count))
            gw = gw if need_w else None
            gb = gb if need_b else None
        return dx, gw, gb, None, None, None, None, None, None


def batch_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, group: Group, eps: float,
               sample_backward: bool, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
               momentum) -> torch.Tensor:
    """:func:`fxbns.ops.reference.batch_norm` for one sample group on CUDA (see the module docstring)."""
    if not x.is_contiguous(memory_format=dense_memory_format(x)):
        x = x.contiguous()
    return _CudaSampledBatchNorm.apply(x, weight, bias, group, eps, sample_backward, running_mean, running_var,
                                       momentum)
