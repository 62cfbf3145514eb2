"""Which implementation of the sampled batch norm runs, and when a layer stays exact.

Every path computes the same function (:mod:`fxbns.ops.reference` is its definition and the tests' oracle);
this module is the one place that picks a path from what is known on the host without looking at tensor
values: the device type, the dtypes, the sample's form and whether ``torch.compile`` is tracing.

Two rules keep a layer exact, and they are kept apart:

- the *statistical* rule (:data:`MIN_VALUES_PER_CHANNEL`), the same on every device: a sample with fewer values
  per channel than this is too small to estimate a variance from;
- the *speed* rule (:class:`SpeedRule`, one per device type in :data:`SPEED_RULES`): layers too small for
  sampling to pay for its extra kernels.  The CPU values were measured on a 2-core CPU
  (``python tools/bench.py layer`` and ``train``, see docs/benchmarks.md); the CUDA values are a stated default
  until ``scripts/gpu-check.sh`` measures them.  A device type without an entry samples every layer the
  statistical rule allows.

>>> from fxbns.ops.dispatch import speed_rule
>>> speed_rule("cpu").min_elements("fs"), speed_rule("cuda").min_elements("fs")
(524288, 4194304)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..estimators import FeatureSampling

__all__ = ["MIN_VALUES_PER_CHANNEL", "MIN_SAMPLE_BACKWARD_VALUES", "MIN_SAMPLE_BACKWARD_FRACTION",
           "sample_backward_applies", "SpeedRule", "SPEED_RULES", "speed_rule", "choose_path"]

#: A BS or FS sample with fewer values per channel than this keeps exact statistics, on every device.
#: With n independent values the relative standard error of a variance estimate is sqrt(2 / (n - 1)): 18% at 64,
#: 25% at 32, and sampled values within a feature map are correlated, so the effective count is lower still
#: (``examples/estimation_error.py``: 2,048 values in whole samples were worth 5 independent ones on conv features
#: of real photographs).  Below 64 the estimate is noisier than plain BatchNorm at the micro-batch sizes where it is
#: already known to degrade, and a sampled backward fed such sums amplifies that noise layer after layer.
MIN_VALUES_PER_CHANNEL = 64


#: ``sample_backward`` estimates the backward's two sums from the sample only where the sample has at least
#: :data:`MIN_SAMPLE_BACKWARD_VALUES` values per channel and at least :data:`MIN_SAMPLE_BACKWARD_FRACTION` of the
#: layer's values per channel; elsewhere the exact-gradient backward (full sums) runs.  The sums' sampling error
#: adds a per-channel constant and a multiple of ``xhat`` to every element of the input gradient: the directions
#: exact BatchNorm's backward removes.  The weight gradient of the layer below sums that error over all ``M``
#: positions coherently, so its share of the gradient grows as ``sqrt(M / n_eff)``, one over the square root of
#: the fraction sampled, whatever the layer's size (``docs/statistics.md``, sample_backward).  Over 20 SGD steps
#: from random weights (``examples/gradient_stability.py``): mobilenet_v2 with the fs preset's 1/16 bands reached
#: 2.65x exact BatchNorm's gradient norm (``--sb-fraction 0``), with 1/4 bands 1.41x.
MIN_SAMPLE_BACKWARD_VALUES = 1024
MIN_SAMPLE_BACKWARD_FRACTION = 0.25


def sample_backward_applies(spec, count: int, total: int) -> bool:
    """Whether the sample of estimator ``spec``, ``count`` of a layer's ``total`` values per channel, estimates the
    backward's sums (see :data:`MIN_SAMPLE_BACKWARD_VALUES` and :data:`MIN_SAMPLE_BACKWARD_FRACTION`, read per
    call).  Only a :class:`~fxbns.FeatureSampling` sample does: BS's few whole samples are worth about as many
    independent values as they have rows (``docs/statistics.md``)."""
    return (isinstance(spec, FeatureSampling) and spec.sample_backward and count >= MIN_SAMPLE_BACKWARD_VALUES
            and count >= MIN_SAMPLE_BACKWARD_FRACTION * total)


@dataclass(frozen=True)
class SpeedRule:
    """The speed thresholds of one device type.

    ``min_elements_bs`` / ``min_elements_fs``: a layer whose :func:`layer_size` is below this keeps exact
    statistics under a preset (a spec with ``min_elements=None``); ``map_floor``: maps of 2 to ``map_floor``
    elements count as ``map_floor`` in that size (aten's CPU kernels cost per (sample, channel) plane);
    ``tiny_map_rows``: exact layers on maps of 2 to 4 elements of at least ``tiny_map_min_numel`` elements run as
    an (N*H*W, C) matrix (faster on the CPU kernels).
    """

    min_elements_bs: int
    min_elements_fs: int
    map_floor: int = 1
    tiny_map_rows: bool = False
    tiny_map_min_numel: int = 1 << 15
    measured: bool = False  # False: a stated default, not yet measured on that device

    def min_elements(self, kind: str) -> int:
        """The preset threshold for an estimator ``kind`` ("bs" or "fs")."""
        return self.min_elements_bs if kind == "bs" else self.min_elements_fs

    def layer_size(self, shape: tuple[int, ...]) -> int:
        """The size compared with ``min_elements`` for an input of ``shape`` (real rows):
        ``N * C * max(map size, map_floor)``, a map of one element counting as 1."""
        planes = shape[0] * (shape[1] if len(shape) > 1 else 1)
        m = math.prod(shape[2:])
        return planes * (m if m == 1 else max(m, self.map_floor))


SPEED_RULES: dict[str, SpeedRule] = {
    # measured on the CPU: bs crossover 2**18 (python tools/bench.py layer --shapes mobilenet_v2 / resnet18),
    # fs 2**19 (whole training steps, python tools/bench.py train --baseline fs), per-plane floor 16 on maps of
    # 2-15 elements, and the (N*H*W, C) form of exact layers on 2x2 maps (see fxbns/ops/cpu.py)
    "cpu": SpeedRule(min_elements_bs=1 << 18, min_elements_fs=1 << 19, map_floor=16, tiny_map_rows=True,
                     measured=True),
    # stated default, not measured: in eager CUDA a sampled layer runs 7 kernels against cuDNN's 2, a few
    # microseconds each, and saves 1 (3 with sample_backward) of native's 8 tensor-sized memory streams.  At about
    # 3 TB/s one fp32 stream of 2**22 elements takes about 5.6 us, so below that the extra launches cost about what
    # the saved streams gain.  scripts/gpu-check.sh measures the layer and records the crossover.
    "cuda": SpeedRule(min_elements_bs=1 << 22, min_elements_fs=1 << 22),
}

_NO_RULE = SpeedRule(min_elements_bs=0, min_elements_fs=0)


def speed_rule(device_type: str) -> SpeedRule:
    """The speed rule of a device type ("cpu", "cuda", ...); a device type without one samples every layer."""
    return SPEED_RULES.get(device_type, _NO_RULE)


_CUDA_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CPU_FLOATS = (torch.float32, torch.float64)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def choose_path(x: torch.Tensor, weight: torch.Tensor | None, n_groups: int, running: torch.Tensor | None) -> str:
    """``"cuda"``, ``"cpu"`` or ``"reference"`` for one training call (host facts only: no tensor values).

    - ``torch.compile`` tracing, meta and other devices, and pooled samples (VDN mixing, several groups): the
      reference (plain torch ops the compiler fuses itself).
    - CUDA: SyncBatchNorm's primitives (:mod:`fxbns.ops.cuda`) for fp16/bf16/fp32/fp64 inputs whose weight is
      in the accumulation dtype (fp32 for fp16/bf16, as under AMP; the input's own dtype for fp32/fp64) or absent;
      the preconditions are listed and cited there.
    - CPU: the fused path (:mod:`fxbns.ops.cpu`) for fp32/fp64 with weight and running statistics in the input's
      dtype.
    """
    if n_groups != 1 or torch.compiler.is_compiling():
        return "reference"
    dt = x.dtype
    if x.is_cuda:
        # the weight in the accumulation dtype (fp32 for fp16/bf16: AMP's fp32 parameters), or None; running
        # statistics whose accumulation dtype is the input's (see the preconditions in fxbns/ops/cuda.py)
        if dt not in _CUDA_FLOATS or (weight is not None and weight.dtype != _acc(dt)):
            return "reference"
        if running is not None and _acc(running.dtype) != _acc(dt):
            return "reference"
        return "cuda"
    if x.is_cpu and dt in _CPU_FLOATS and (weight is None or weight.dtype == dt) and (
            running is None or running.dtype == dt):
        return "cpu"
    return "reference"
