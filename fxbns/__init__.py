"""fxbns: sampled-statistics BatchNorm as a torch.fx compiler pass.

After Chen et al., "Effective and Efficient Batch Normalization Using a Few Uncorrelated Data for
Statistics Estimation", IEEE TNNLS 2020 (arXiv 1810.10962).
"""

from ._version import __version__
from .api import TransformInfo, explain, load, report, revert, save, transform
from .estimators import BatchSampling, Exact, FeatureSampling, MicroBatch, VirtualDataset
from .export import ExportResult, export_onnx
from .modules import SampledBatchNorm
from .ops import sampled_batch_norm
from .passes.fold import FoldResult, fold
from .policy import PRESETS, Policy
from .report import Report
from .stats import CalibrationResult, RecalibrationResult, calibrate, recalibrate
from .tune import TuneResult, tune

__all__ = [
    "__version__",
    "Exact",
    "BatchSampling",
    "FeatureSampling",
    "VirtualDataset",
    "MicroBatch",
    "SampledBatchNorm",
    "Policy",
    "PRESETS",
    "Report",
    "TransformInfo",
    "transform",
    "explain",
    "report",
    "revert",
    "save",
    "load",
    "fold",
    "FoldResult",
    "export_onnx",
    "ExportResult",
    "sampled_batch_norm",
    "tune",
    "TuneResult",
    "recalibrate",
    "RecalibrationResult",
    "calibrate",
    "CalibrationResult",
]
