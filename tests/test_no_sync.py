"""The training path is device-agnostic and free of host-device synchronisation.

No GPU here: a training step on meta tensors (which have no data, so any .item() or host copy fails)
and torch.compile(fullgraph=True) (a graph break on a sync or data-dependent branch fails) prove it.
"""

import copy

import pytest
import torch
import torchvision
from conftest import every_layer
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fxbns
from fxbns import BatchSampling, FeatureSampling, MicroBatch, SampledBatchNorm, VirtualDataset

SPECS = [BatchSampling(ratio=0.25), BatchSampling(ratio=0.25, draw="random", sample_backward=True),
         FeatureSampling(patch=(3, 3)), FeatureSampling(area_ratio=1 / 16, layout="grid", per_sample=True),
         FeatureSampling(area_ratio=1 / 16, layout="grid", per_sample=True, sample_backward=True),
         FeatureSampling(area_ratio=1 / 16, layout="band", per_sample=True),
         FeatureSampling(area_ratio=1 / 16, layout="band", per_sample=True, sample_backward=True)]


def _block(spec):
    blk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    blk[1] = SampledBatchNorm.from_batchnorm(blk[1], spec)
    return blk


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_meta_training_step(spec):
    blk = _block(spec).to("meta")
    y = blk(torch.randn(8, 3, 16, 16, device="meta"))
    y.sum().backward()
    assert blk[0].weight.grad.device.type == "meta"
    assert blk[1].num_batches_tracked.device.type == "meta"


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_compile_fullgraph_conv_bn_relu(spec):
    torch._dynamo.reset()
    blk = _block(spec)
    ref = copy.deepcopy(blk)  # eager: the same sample (host-drawn views and fused kernels there)
    x = torch.randn(8, 3, 16, 16)
    cblk = torch.compile(blk, fullgraph=True)
    y = cblk(x)
    y.square().sum().backward()
    yr = ref(x)
    yr.square().sum().backward()
    torch.testing.assert_close(y, yr, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(blk[0].weight.grad, ref[0].weight.grad, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(blk[1].running_var, ref[1].running_var)


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_eager_cpu_step_never_reads_a_tensor_on_the_host(spec):
    """The eager path on a real device (here the CPU) with its fused kernels: every aten op of a training step
    is logged, and none of them reads a tensor value into Python (``.item()``, ``int(t)``, ``bool(t)`` all go
    through ``_local_scalar_dense``), which is what would synchronise a GPU."""
    blk = _block(spec)
    x = torch.randn(8, 3, 16, 16)
    blk(x).sum().backward()  # the first step may set things up
    with _OpLog() as log:
        blk(x).sum().backward()
    assert "_local_scalar_dense" not in log.ops and "item" not in log.ops
    if spec.draw == "block" if isinstance(spec, BatchSampling) else spec.layout == "band":
        # the fused path ran: aten's batch-norm kernels (the sample's statistics from batch_norm_update_stats or
        # the training-mode op, the normalisation from the eval-mode op, the backward's sums)
        assert log.ops.count("native_batch_norm") + log.ops.count("batch_norm_update_stats") >= 2
        assert "native_batch_norm_backward" in log.ops
        assert "index_select" not in log.ops and "gather" not in log.ops  # a strided view, no index tensors


@pytest.mark.parametrize("preset", ["bs", "fs", "vdn", "micro"])
def test_transformed_model_meta_step(preset):
    m = torchvision.models.resnet18(num_classes=10)
    gm = fxbns.transform(m, every_layer(preset), example_inputs=torch.randn(2, 3, 32, 32)).to("meta")
    gm.train()
    out = gm(torch.randn(2, 3, 32, 32, device="meta"))
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in gm.parameters())


def test_micro_virtual_block_compiles():
    torch._dynamo.reset()
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
    m(torch.randn(2, 3, 8, 8))
    pol = fxbns.Policy(VirtualDataset(num_samples=2, mix=0.5), micro=MicroBatch(threshold=2))
    gm = fxbns.transform(m, pol, example_inputs=torch.randn(2, 3, 8, 8))
    cgm = torch.compile(gm, fullgraph=True)
    for n in (1, 4):
        out = cgm(torch.randn(n, 3, 8, 8))
        assert out.shape == (n, 4)
        out.sum().backward()
