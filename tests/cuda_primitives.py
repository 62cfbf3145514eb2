"""The CUDA batch-norm primitives of ``nn.SyncBatchNorm``, emulated on the CPU and on meta tensors, with the
preconditions their CUDA implementation relies on checked on every call.

aten has these ops for CUDA only (``batch_norm_stats``, ``batch_norm_elemt``,
``batch_norm_gather_stats_with_counts``, ``batch_norm_backward_reduce``, ``batch_norm_backward_elemt``).  To run
:mod:`fxbns.ops.cuda`'s logic on a machine without a GPU, the tests register CPU and Meta kernels for them here:
the arithmetic of ``aten/src/ATen/native/cuda/Normalization.cuh`` (two-pass statistics, the per-rank combination
of ``batch_norm_reduce_statistics_kernel``, the element-wise formulas), and an ``AssertionError`` for any call the
CUDA kernels would reject or misread (see :mod:`fxbns.ops.cuda` for the preconditions and their source).  On a
machine with a GPU the real kernels run instead (``tests/test_ops.py``, ``cuda`` marker).

``install()`` registers the kernels once per process; :data:`CALLS` records every call with its arguments'
dtypes, shapes and strides.
"""

from __future__ import annotations

import torch

CALLS: list[tuple[str, tuple]] = []
_LIB = None


def _acc(dt: torch.dtype) -> torch.dtype:
    return torch.float64 if dt == torch.float64 else torch.float32


def _cl_kernel(t: torch.Tensor) -> bool:
    """``batch_norm_use_channels_last_kernels`` (Normalization.cu)."""
    return t.ndim >= 3 and (t.is_contiguous(memory_format=torch.channels_last) if t.ndim == 4 else
                            (t.ndim == 5 and t.is_contiguous(memory_format=torch.channels_last_3d))) or (
        t.is_contiguous() and t.ndim >= 2 and t.stride(1) == 1)


def _suggest_memory_format(t: torch.Tensor) -> torch.memory_format:
    """``Tensor::suggest_memory_format`` for the dense layouts met here."""
    if t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    if t.ndim == 5 and t.is_contiguous(memory_format=torch.channels_last_3d) and not t.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def _stat(t: torch.Tensor, x: torch.Tensor, name: str) -> None:
    assert t.dtype == _acc(x.dtype), f"{name} must be {_acc(x.dtype)} for a {x.dtype} input, got {t.dtype}"
    assert t.ndim == 1 and t.shape[0] == x.shape[1] and t.is_contiguous(), f"{name} must be a contiguous (C,) vector"
    assert t.device == x.device, f"{name} on {t.device}, input on {x.device}"


def _weight(w, x: torch.Tensor) -> None:
    if w is None:
        return
    if x.dtype in (torch.float16, torch.bfloat16):
        # batch_norm_backward_elemt_cuda: is_half_float / is_bfloat16_float -> the weight accessor is accscalar_t
        assert w.dtype == torch.float32, f"weight must be float32 for a {x.dtype} input, got {w.dtype}"
    else:
        assert w.dtype == x.dtype, f"weight must be {x.dtype} for a {x.dtype} input, got {w.dtype}"
    assert w.is_contiguous() and w.device == x.device


def _red(x: torch.Tensor) -> list[int]:
    return [0] + list(range(2, x.ndim))


def _b(t: torch.Tensor, nd: int) -> torch.Tensor:
    return t.reshape([1, -1] + [1] * (nd - 2))


def _record(name: str, *args) -> None:
    # every tensor argument on one device: the CUDA kernels read them all through device pointers (a host tensor
    # here, say a count made on the default device, would fail on a GPU)
    devices = {a.device for a in args if isinstance(a, torch.Tensor)}
    assert len(devices) <= 1, f"{name}: tensor arguments on several devices: {sorted(map(str, devices))}"
    CALLS.append((name, tuple((a.dtype, tuple(a.shape), a.stride(), a.device.type) if isinstance(a, torch.Tensor)
                              else a for a in args)))


def _meta(t: torch.Tensor) -> bool:
    return t.device.type == "meta"


def batch_norm_stats(x, eps):
    _record("batch_norm_stats", x, eps)
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    acc = _acc(x.dtype)
    c = x.shape[1]
    if _meta(x):
        return torch.empty(c, dtype=acc, device=x.device), torch.empty(c, dtype=acc, device=x.device)
    xf = x.to(acc)
    mean = xf.mean(_red(x))
    var = (xf - _b(mean, x.ndim)).square().mean(_red(x))
    return mean, torch.rsqrt(var + eps)


def batch_norm_elemt(x, weight, bias, mean, invstd, eps):
    _record("batch_norm_elemt", x, weight, bias, mean, invstd, eps)
    _stat(mean, x, "mean")
    _stat(invstd, x, "invstd")
    if weight is not None and weight.dtype != x.dtype:
        assert weight.dtype == _acc(x.dtype), "a weight of another dtype than the input is read as accscalar_t"
    if bias is not None and weight is not None:
        assert bias.dtype == weight.dtype
    # batch_norm_elemt_cuda: ``at::empty_like(self)``, i.e. the input's own strides (preserve_format)
    out = torch.empty_like(x)
    if _meta(x):
        return out
    acc = mean.dtype
    y = (x.to(acc) - _b(mean, x.ndim)) * _b(invstd, x.ndim)
    if weight is not None:
        y = y * _b(weight.to(acc), x.ndim)
    if bias is not None:
        y = y + _b(bias.to(acc), x.ndim)
    return out.copy_(y)


def batch_norm_gather_stats_with_counts(x, mean, invstd, running_mean, running_var, momentum, eps, counts):
    _record("batch_norm_gather_stats_with_counts", x, mean, invstd, running_mean, running_var, momentum, eps, counts)
    assert mean.ndim == 2 and invstd.ndim == 2 and counts.ndim == 1 and counts.shape[0] == mean.shape[0]
    scalar = running_mean.dtype if running_mean is not None else x.dtype
    assert counts.dtype == scalar, f"counts must be {scalar} (the running statistics' dtype), got {counts.dtype}"
    assert mean.dtype == _acc(scalar) == invstd.dtype, "mean/invstd must be the accumulation dtype"
    assert (running_mean is None) == (running_var is None)
    c = mean.shape[1]
    if _meta(x):
        return torch.empty(c, dtype=mean.dtype, device=x.device), torch.empty(c, dtype=mean.dtype, device=x.device)
    acc = mean.dtype
    avg = torch.zeros(c, dtype=acc)
    var_n = torch.zeros(c, dtype=acc)
    n = 0.0
    for j in range(mean.shape[0]):  # batch_norm_reduce_statistics_kernel: Chan's combination, rank by rank
        cnt = float(counts[j])
        m = mean[j]
        v = (1.0 / invstd[j]).square() - eps
        v = v * cnt
        f = 1.0 / (n + cnt)
        var_n = var_n + v + (avg - m).square() * n * cnt * f
        avg = n * f * avg + cnt * f * m
        n += cnt
    out_invstd = 1.0 / torch.sqrt(var_n / n + eps)
    if running_mean is not None:
        running_mean.copy_(((1 - momentum) * running_mean.to(acc) + momentum * avg).to(running_mean.dtype))
        running_var.copy_(((1 - momentum) * running_var.to(acc) + momentum * var_n / (n - 1)).to(running_var.dtype))
    return avg, out_invstd


def batch_norm_backward_reduce(dy, x, mean, invstd, weight, input_g, weight_g, bias_g):
    _record("batch_norm_backward_reduce", dy, x, mean, invstd, weight, input_g, weight_g, bias_g)
    assert dy.dtype == x.dtype and dy.shape == x.shape
    _stat(mean, x, "mean")
    _stat(invstd, x, "invstd")
    _weight(weight, x)
    assert weight is not None or not (weight_g or bias_g), "weight_g/bias_g need a weight (grad_weight_ = empty_like)"
    c = x.shape[1]
    acc = mean.dtype
    wdt = weight.dtype if weight is not None else acc
    if _meta(x):
        e = torch.empty(c, dtype=acc, device=x.device)
        return e, e.clone(), torch.empty(c, dtype=wdt, device=x.device), torch.empty(c, dtype=wdt, device=x.device)
    dyf = dy.to(acc)
    sum_dy = dyf.sum(_red(x))
    sum_dy_xmu = (dyf * (x.to(acc) - _b(mean, x.ndim))).sum(_red(x))
    gw = (sum_dy_xmu * invstd).to(wdt) if weight_g else torch.empty(0, dtype=wdt)
    gb = sum_dy.to(wdt) if bias_g else torch.empty(0, dtype=wdt)
    if not input_g:
        sum_dy, sum_dy_xmu = torch.empty(0, dtype=acc), torch.empty(0, dtype=acc)
    return sum_dy, sum_dy_xmu, gw, gb


def batch_norm_backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
    _record("batch_norm_backward_elemt", dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count)
    assert dy.dtype == x.dtype and dy.shape == x.shape
    _stat(mean, x, "mean")
    _stat(invstd, x, "invstd")
    _stat(sum_dy, x, "sum_dy")
    _stat(sum_dy_xmu, x, "sum_dy_xmu")
    _weight(weight, x)
    assert count.dtype == torch.int32 and count.ndim == 1 and count.device == x.device, \
        "count must be an int32 vector on the input's device (count.const_data_ptr<int>())"
    if _cl_kernel(dy):
        # the channels-last kernel reads dy and x through raw pointers with dy's layout
        assert x.stride() == dy.stride(), f"x strides {x.stride()} differ from dy's {dy.stride()} (channels-last kernel)"
    # the channels-last kernel allocates ``at::empty_like(input, input.suggest_memory_format())``, the other
    # template a contiguous tensor
    fmt = _suggest_memory_format(x) if _cl_kernel(dy) and _cl_kernel(x) else torch.contiguous_format
    if _meta(x):
        return torch.empty_like(x, memory_format=fmt)
    acc = mean.dtype
    n = float(count.to(torch.float64).sum())
    nd = x.ndim
    w = _b(weight.to(acc), nd) if weight is not None else 1.0
    dx = (dy.to(acc) - _b(sum_dy / n, nd) - (x.to(acc) - _b(mean, nd)) * _b(invstd.square() * sum_dy_xmu / n, nd)) \
        * _b(invstd, nd) * w
    return dx.to(dy.dtype).contiguous(memory_format=fmt)


_OPS = {"batch_norm_stats": batch_norm_stats, "batch_norm_elemt": batch_norm_elemt,
        "batch_norm_gather_stats_with_counts": batch_norm_gather_stats_with_counts,
        "batch_norm_backward_reduce": batch_norm_backward_reduce,
        "batch_norm_backward_elemt": batch_norm_backward_elemt}


def install() -> None:
    """Register the emulations as the ops' CPU and Meta kernels (once per process)."""
    global _LIB
    if _LIB is not None:
        return
    lib = torch.library.Library("aten", "IMPL")
    for name, fn in _OPS.items():
        for key in ("CPU", "Meta"):
            lib.impl(name, fn, key)
    _LIB = lib
