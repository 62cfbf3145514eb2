"""The sampled batch norm op: one meaning (:mod:`.reference`), a fast path per device (:mod:`.cuda`, :mod:`.cpu`),
chosen in one place (:mod:`.dispatch`).

>>> import torch
>>> from fxbns.sampling import Group
>>> x = torch.randn(8, 4, 6, 6)
>>> g = Group(0, 8, 1.0, 2 * 36, view=lambda t: t.narrow(0, 2, 2), shift=(2, 0, 0, 0))  # rows 2-3
>>> y_ref = sampled_batch_norm(x, None, None, [g], 1e-5, path="reference")
>>> y_cpu = sampled_batch_norm(x, None, None, [g], 1e-5, path="cpu")
>>> torch.allclose(y_ref, y_cpu, atol=1e-5)
True
"""

from __future__ import annotations

import torch

from ..sampling import Group
from . import cpu, cuda, reference
from .dispatch import MIN_VALUES_PER_CHANNEL, SPEED_RULES, SpeedRule, choose_path, speed_rule

__all__ = ["sampled_batch_norm", "choose_path", "speed_rule", "SpeedRule", "SPEED_RULES", "MIN_VALUES_PER_CHANNEL"]


def sampled_batch_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: list[Group],
                       eps: float, sample_backward: bool = False, running_mean: torch.Tensor | None = None,
                       running_var: torch.Tensor | None = None, momentum=0.1, *, path: str | None = None
                       ) -> torch.Tensor:
    """Normalise ``x`` with statistics from the sample ``groups``; update the running statistics in place.

    Args:
        x: the input, (N, C, ...).
        weight, bias: the affine parameters (C,), or None.
        groups: the sample (:func:`fxbns.sampling.build_groups`); ``sample_backward`` needs exactly one.
        eps: added to the variance.
        sample_backward: estimate the backward's two sums from the sample (BatchNorm's backward formula fed the
            sample's sums, on every element).
        running_mean, running_var: updated in place with the sample's mean and unbiased variance, when given.
        momentum: a float, or a 0-d tensor (the cumulative average's ``1 / num_batches_tracked``).
        path: ``"reference"``, ``"cpu"`` or ``"cuda"`` to force an implementation; None chooses
            (:func:`fxbns.ops.dispatch.choose_path`).
    Returns:
        The output, in ``x``'s dtype; gradients flow to ``x``, ``weight`` and ``bias``.
    """
    if sample_backward and len(groups) != 1:
        raise ValueError("sample_backward needs a single sample group (it is not available with VDN mixing)")
    if path is None:
        path = choose_path(x, weight, len(groups), running_mean)
    if path == "cuda":
        return cuda.batch_norm(x, weight, bias, groups[0], eps, sample_backward, running_mean, running_var, momentum)
    if path == "cpu":
        if running_mean is None or isinstance(momentum, float):
            return cpu.fused_batch_norm(x, weight, bias, groups[0], eps, sample_backward, running_mean, running_var,
                                        momentum if running_mean is not None else 0.0)
        stats: list = []  # a tensor momentum: the op returns the sample's statistics, the update follows
        y = cpu.fused_batch_norm(x, weight, bias, groups[0], eps, sample_backward, None, None, 0.0, stats)
        reference.update_running_stats(running_mean, running_var, stats[0], stats[1], groups[0].count, momentum)
        return y
    if path not in ("cpu", "reference"):
        raise ValueError(f"path must be 'reference', 'cpu', 'cuda' or None; got {path!r}")
    return reference.batch_norm(x, weight, bias, groups, eps, sample_backward, running_mean, running_var, momentum)
