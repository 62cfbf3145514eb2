"""fxbns: sampled-statistics BatchNorm as a torch.fx compiler pass.

After Chen et al., "Effective and Efficient Batch Normalization Using a Few Uncorrelated Data for
Statistics Estimation", IEEE TNNLS 2020 (arXiv 1810.10962).
"""

from ._version import __version__
from .estimators import BatchSampling, Exact, FeatureSampling, MicroBatch, VirtualDataset
from .functional import sampled_batch_norm
from .modules import SampledBatchNorm

__all__ = [
    "__version__",
    "Exact",
    "BatchSampling",
    "FeatureSampling",
    "VirtualDataset",
    "MicroBatch",
    "SampledBatchNorm",
    "sampled_batch_norm",
]
