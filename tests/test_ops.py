"""Every fast path of the sampled batch norm against the reference op, the CUDA path's preconditions on every
recorded aten call, the statistical rule, and samples that stay the same under recomputation.

The CUDA path runs here on the CPU through ``tests/cuda_primitives.py`` (an emulation of SyncBatchNorm's five CUDA
primitives that asserts each precondition fxbns.ops.cuda relies on); on a machine with a GPU the ``cuda``-marked
tests run the real kernels.
"""

import copy
import math

import cuda_primitives
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fxbns.ops as ops
from fxbns import BatchSampling, Exact, FeatureSampling, SampledBatchNorm
from fxbns.modules import exact_reason
from fxbns.ops import dispatch, sampled_batch_norm
from fxbns.ops.reference import sample_moments
from fxbns.sampling import build_groups, gather

cuda_primitives.install()
HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])

SPECS = [BatchSampling(ratio=0.25), BatchSampling(ratio=0.25, draw="random"),
         FeatureSampling(area_ratio=1 / 4, layout="band", per_sample=True),
         FeatureSampling(area_ratio=1 / 4, layout="band"),
         FeatureSampling(patch=(3, 3)), FeatureSampling(area_ratio=1 / 4, layout="grid", per_sample=True)]


def _run(path, x, w, b, groups, sb, dy, momentum=0.1):
    xx = x.clone().requires_grad_()
    ww = w.clone().requires_grad_() if w is not None else None
    bb = b.clone().requires_grad_() if b is not None else None
    rm = torch.zeros(x.shape[1], dtype=w.dtype if w is not None else (
        torch.float64 if x.dtype == torch.float64 else torch.float32), device=x.device)
    rv = torch.ones_like(rm)
    y = sampled_batch_norm(xx, ww, bb, groups, 1e-5, sb, rm, rv, momentum, path=path)
    y.backward(dy)
    return [y, xx.grad, ww.grad if ww is not None else None, bb.grad if bb is not None else None, rm, rv]


def _compare(a, b, tol):
    for i, (u, v) in enumerate(zip(a, b)):
        if u is None:
            assert v is None
            continue
        torch.testing.assert_close(u.float(), v.float(), atol=tol, rtol=tol, msg=lambda m, i=i: f"output {i}: {m}")


def _case(shape, layout, dtype, device, affine=True):
    x = (torch.randn(shape, device=device) * 2 + 1).to(dtype)
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last if x.ndim == 4 else torch.channels_last_3d)
    wdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    w = torch.rand(shape[1], dtype=wdt, device=device) + 0.5 if affine else None
    b = torch.randn(shape[1], dtype=wdt, device=device) if affine else None
    dy = torch.randn(shape, device=device).to(dtype)
    if layout == "cl":
        dy = dy.contiguous(memory_format=x.dtype and torch.contiguous_format)  # a gradient in another layout
    return x, w, b, dy


SHAPES = {"nchw": (8, 6, 10, 10), "cl": (8, 6, 10, 10), "nc": (64, 6), "3d": (4, 5, 4, 6, 6)}


@pytest.mark.parametrize("path", ["cpu", "cuda"])
@pytest.mark.parametrize("layout", list(SHAPES))
@pytest.mark.parametrize("sb", [False, True], ids=["exact-grad", "sample_backward"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
@pytest.mark.parametrize("host", [True, False], ids=["host-draw", "device-draw"])
def test_fast_path_equals_reference_fp64(path, layout, sb, spec, host):
    """Outputs, input and parameter gradients, running statistics: fast path == reference (float64)."""
    shape = SHAPES[layout]
    if isinstance(spec, FeatureSampling) and spec.patch is not None and len(shape) != 4:
        spec = dataclass_replace(spec, patch=(2,) * (len(shape) - 2)) if len(shape) > 2 else SPECS[0]
    x, w, b, dy = _case(shape, layout, torch.float64, "cpu")
    groups = build_groups(spec, shape, shape[0], 0, torch.tensor(5), 3, host_step=5 if host else None)
    _compare(_run("reference", x, w, b, groups, sb, dy), _run(path, x, w, b, groups, sb, dy), 1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["nchw", "cl", "nc"])
@pytest.mark.parametrize("sb", [False, True], ids=["exact-grad", "sample_backward"])
def test_cuda_path_mixed_precision_equals_reference(dtype, layout, sb):
    """fp16/bf16 inputs with fp32 weights and statistics (AMP's case) on the CUDA path: the reference's values."""
    shape = SHAPES[layout]
    x, w, b, dy = _case(shape, layout, dtype, "cpu")
    groups = build_groups(SPECS[2] if layout != "nc" else SPECS[0], shape, shape[0], 0, torch.tensor(1), 2, host_step=1)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    _compare(_run("reference", x, w, b, groups, sb, dy), _run("cuda", x, w, b, groups, sb, dy), tol)


@st.composite
def _op_case(draw):
    nd = draw(st.sampled_from([2, 4, 4, 5]))
    n = draw(st.integers(2, 16))
    c = draw(st.integers(1, 64))
    spatial = {2: (), 4: tuple(draw(st.integers(1, 32)) for _ in range(2)),
               5: tuple(draw(st.integers(1, 6)) for _ in range(3))}[nd]
    spec = draw(st.sampled_from(SPECS[:3] if nd != 4 else SPECS))
    if isinstance(spec, FeatureSampling) and spec.patch is not None and nd != 4:
        spec = SPECS[2]
    return ((n, c, *spatial), spec, draw(st.booleans()), draw(st.booleans()), draw(st.booleans()),
            draw(st.sampled_from(["cpu", "cuda"])), draw(st.sampled_from([0.1, None])))


@given(_op_case())
@example(((1, 3, 1, 1), SPECS[0], True, True, False, "cuda", None))  # batch 1, 1x1 map: the whole "sample"
@example(((16, 64, 32, 32), SPECS[2], True, True, True, "cpu", None))  # C = 64, 32x32 maps, cumulative average
def test_fast_paths_equal_reference_on_random_shapes(case):
    shape, spec, affine, sb, cl, path, momentum = case
    layout = "cl" if cl and len(shape) >= 4 else "nchw"
    x, w, b, dy = _case(shape, layout, torch.float64, "cpu", affine)
    groups = build_groups(spec, shape, shape[0], 0, torch.tensor(2), 7, host_step=2)
    mom = momentum if momentum is not None else torch.tensor(0.25, dtype=torch.float64)
    _compare(_run("reference", x, w, b, groups, sb, dy, mom), _run(path, x, w, b, groups, sb, dy, mom), 1e-9)


def test_sample_backward_formula():
    """sample_backward is BatchNorm's backward fed the sample's sums, on every element (float64, by hand)."""
    shape = (8, 3, 6, 6)
    x = torch.randn(shape, dtype=torch.float64) * 3 + 2
    w, b = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    dy = torch.randn(shape, dtype=torch.float64)
    groups = build_groups(BatchSampling(ratio=0.25), shape, 8, 0, torch.tensor(0), 1, host_step=0)
    xs, dys = gather(x, groups[0]), gather(dy, groups[0])
    m = xs.numel() // 3
    mean = xs.mean((0, 2, 3))
    var = xs.var((0, 2, 3), unbiased=False)
    invstd = (var + 1e-5).rsqrt()
    v = lambda t: t.view(1, 3, 1, 1)  # noqa: E731
    xhat, xhat_s = (x - v(mean)) * v(invstd), (xs - v(mean)) * v(invstd)
    mdy, mdyx = dys.sum((0, 2, 3)) / m, (dys * xhat_s).sum((0, 2, 3)) / m
    want_dx = v(w * invstd) * (dy - v(mdy) - xhat * v(mdyx))
    full = x.numel() // 3
    for path in ("reference", "cpu", "cuda"):
        y, dx, dw, db, _, _ = _run(path, x, w, b, groups, True, dy)
        torch.testing.assert_close(y, xhat * v(w) + v(b))
        torch.testing.assert_close(dx, want_dx)
        torch.testing.assert_close(dw, mdyx * full)
        torch.testing.assert_close(db, mdy * full)
    # the statistics' term is spread over every element: it is not concentrated on the sample
    direct = dy * v(w * invstd)
    outside = torch.ones(shape, dtype=torch.bool)
    outside[groups[0].shift[0]:groups[0].shift[0] + 2] = False
    assert ((dx - direct)[outside].abs() > 1e-9).float().mean() > 0.9


def test_exact_gradient_form_is_autograd_of_the_reference():
    """Without sample_backward the fast paths' gradients are the exact gradients of the sampled function."""
    shape = (6, 3, 5, 6)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    for spec in SPECS:
        groups = build_groups(spec, shape, 6, 0, torch.tensor(4), seed=2, host_step=4)
        for path in ("cpu", "cuda"):
            assert torch.autograd.gradcheck(
                lambda x, w, b, g=groups, p=path: sampled_batch_norm(x, w, b, g, 1e-5, False, path=p), (x, w, b))


@pytest.mark.parametrize("shape,fmt", [((4, 6, 5, 5), torch.channels_last), ((4, 6, 3, 4, 4), torch.channels_last_3d),
                                       ((4, 6, 5, 5), torch.contiguous_format)], ids=["cl", "cl3d", "nchw"])
@pytest.mark.parametrize("sb", [False, True], ids=["exact-grad", "sample_backward"])
def test_cuda_path_keeps_the_input_layout(shape, fmt, sb):
    """The CUDA path's output and input gradient keep a channels-last (2d or 3d) input's layout, with no copy of
    the input into another one; an NCHW input stays NCHW."""
    x = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
    w, b = torch.rand(6, dtype=torch.float64) + 0.5, torch.randn(6, dtype=torch.float64)
    groups = build_groups(FeatureSampling(area_ratio=1 / 4, layout="band", per_sample=True), shape, 4, 0,
                          torch.tensor(1), 3)
    cuda_primitives.CALLS.clear()
    y = sampled_batch_norm(x, w, b, groups, 1e-5, sb, None, None, 0.1, path="cuda")
    y.backward(torch.randn(shape, dtype=torch.float64))  # an NCHW gradient: the backward puts it in x's layout
    assert y.is_contiguous(memory_format=fmt) and x.grad.is_contiguous(memory_format=fmt)
    elemt = [args for name, args in cuda_primitives.CALLS if name == "batch_norm_elemt"]
    assert elemt and elemt[0][0][2] == x.stride()  # the forward read x in place, in its own layout


def test_cuda_path_non_dense_input_and_half_running_statistics():
    """A strided (non-dense) input is copied once and normalised like the reference; bf16 running statistics with
    a cumulative (tensor) momentum move like the reference's."""
    base = torch.randn(8, 3, 6, 10, dtype=torch.float64)
    x = base[:, :, :, ::2]  # not dense in any layout
    groups = build_groups(FeatureSampling(area_ratio=1 / 4, layout="band", per_sample=True), tuple(x.shape), 8, 0,
                          torch.tensor(1), 3)
    ref = sampled_batch_norm(x, None, None, groups, 1e-5, False, None, None, 0.1, path="reference")
    torch.testing.assert_close(sampled_batch_norm(x, None, None, groups, 1e-5, False, None, None, 0.1, path="cuda"),
                               ref)
    xh = (torch.randn(8, 3, 6, 5) * 2 + 1).bfloat16()
    groups = build_groups(FeatureSampling(area_ratio=1 / 4, layout="band", per_sample=True), tuple(xh.shape), 8, 0,
                          torch.tensor(1), 3)
    stats = {}
    for path in ("reference", "cuda"):
        rm, rv = torch.zeros(3, dtype=torch.bfloat16), torch.ones(3, dtype=torch.bfloat16)
        sampled_batch_norm(xh, None, None, groups, 1e-5, False, rm, rv, torch.tensor(0.5), path=path)
        stats[path] = (rm, rv)
    for a, b in zip(stats["reference"], stats["cuda"]):
        assert a.dtype == b.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)


def test_reference_defaults_and_partial_affine():
    """The reference's defaults (exact gradients, momentum 0.1) and sample_backward with only one of the affine
    parameters, or a frozen one: each gradient that is asked for, in its parameter's dtype, by the formula."""
    from fxbns.ops import reference

    shape = (8, 3, 6, 6)
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    dy = torch.randn(shape, dtype=torch.float64)
    groups = build_groups(FeatureSampling(area_ratio=1 / 4, layout="band", per_sample=True), shape, 8, 0,
                          torch.tensor(1), 3, host_step=1)
    # the default is the exact gradient of the sampled function, not sample_backward
    xx = x.clone().requires_grad_()
    reference.batch_norm(xx, None, None, groups, 1e-5).backward(dy)
    xe = x.clone().requires_grad_()
    reference.batch_norm(xe, None, None, groups, 1e-5, False).backward(dy)
    xs = x.clone().requires_grad_()
    reference.batch_norm(xs, None, None, groups, 1e-5, True).backward(dy)
    torch.testing.assert_close(xx.grad, xe.grad)
    assert not torch.allclose(xx.grad, xs.grad)
    # the default momentum is nn.BatchNorm's 0.1
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    reference.batch_norm(x, None, None, groups, 1e-5, running_mean=rm, running_var=rv)
    mean, var = sample_moments(x, groups)
    n = groups[0].count
    torch.testing.assert_close(rm, 0.1 * mean)
    torch.testing.assert_close(rv, 0.9 + 0.1 * var * n / (n - 1))
    # sample_backward with a weight and no bias, a bias and no weight, a frozen weight
    m_full = x.numel() // 3
    xg = gather(x, groups[0])
    invstd = (sample_moments(x, groups)[1] + 1e-5).rsqrt()
    xhat_s = (xg - mean.view(1, 3, 1, 1)) * invstd.view(1, 3, 1, 1)
    dys = gather(dy, groups[0])
    want_dw = (dys * xhat_s).sum((0, 2, 3)) / n * m_full
    want_db = dys.sum((0, 2, 3)) / n * m_full
    w = (torch.rand(3) + 0.5).requires_grad_()  # fp32 parameters of an fp64 input: gradients stay fp32
    reference.batch_norm(x.clone().requires_grad_(), w, None, groups, 1e-5, True).backward(dy)
    assert w.grad.dtype == torch.float32
    torch.testing.assert_close(w.grad.double(), want_dw, rtol=1e-6, atol=1e-6)
    b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    reference.batch_norm(x.clone().requires_grad_(), None, b, groups, 1e-5, True).backward(dy)
    torch.testing.assert_close(b.grad, want_db)
    frozen = torch.ones(3, dtype=torch.float64)
    b.grad = None
    reference.batch_norm(x.clone().requires_grad_(), frozen, b, groups, 1e-5, True).backward(dy)
    torch.testing.assert_close(b.grad, want_db)
    assert frozen.grad is None
    # sample_backward needs one group: pooled groups are refused with a message that says so
    two = build_groups(BatchSampling(ratio=0.25), shape, 8, 0, torch.tensor(0), 1, host_step=0) * 2
    with pytest.raises(ValueError, match=r"^sample_backward needs a single sample group \(it is not available "
                                         r"with VDN mixing\)$"):
        reference.batch_norm(x, None, None, two, 1e-5, True)


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, args, kwargs or {}))
        return func(*args, **(kwargs or {}))


_VIEWS = {"as_strided", "narrow", "slice", "view", "unsqueeze", "select", "expand", "transpose", "permute",
          "alias", "t", "reshape", "_reshape_alias", "detach"}


def _kernels(calls):
    return [f for f, _, _ in calls if f.__name__.split(".")[0] not in _VIEWS]


@pytest.mark.parametrize("spec", [BatchSampling(ratio=0.125), BatchSampling(ratio=0.125, sample_backward=True),
                                  FeatureSampling(area_ratio=1 / 16, layout="band", per_sample=True),
                                  FeatureSampling(area_ratio=1 / 16, layout="band", per_sample=True,
                                                  sample_backward=True)], ids=lambda s: s.describe())
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
def test_cuda_path_launches_at_most_8_ops_per_layer(spec, cl, monkeypatch):
    """A sampled layer's forward + backward on the CUDA path, recorded on meta tensors: at most 8 aten ops that
    launch a kernel (views excluded), the step counter's increment included; cuDNN's batch norm needs 2."""
    monkeypatch.setattr(ops, "choose_path", lambda *a: "cuda")
    bn = SampledBatchNorm.from_batchnorm(nn.BatchNorm2d(64), spec).to("meta")
    x = torch.randn(32, 64, 28, 28, device="meta")
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    dy = torch.randn(x.shape, device="meta").contiguous(memory_format=torch.channels_last if cl else
                                                        torch.contiguous_format)
    bn(x).backward(dy)  # a first step makes the cached constants (counts, zeros)
    with _Recorder() as rec:  # autograd.grad: accumulating into .grad is autograd's work, not the layer's
        torch.autograd.grad(bn(x), [x, bn.weight, bn.bias], dy)
    names = [f.__name__ for f in _kernels(rec.calls)]
    assert any("batch_norm_stats" in n for n in names) and any("batch_norm_backward_reduce" in n for n in names)
    assert len(names) <= 8, " ".join(names)


_CONFIGS = [
    ("bs", (32, 16, 8, 8), False, None), ("fs", (16, 16, 16, 16), False, None), ("micro", (2, 8, 6, 6), False, None),
    ("bs", (32, 16, 8, 8), True, None), ("fs", (16, 16, 16, 16), True, None),
    ("fs", (64, 16), False, None), ("bs", (16, 8, 4, 6, 6), False, None), ("fs", (64, 16, 2, 2), False, None),
    ("fs", (16, 16, 16, 16), False, torch.bfloat16), ("bs", (32, 16, 8, 8), True, torch.bfloat16),
]


@pytest.mark.parametrize("preset,shape,cl,amp", _CONFIGS)
@pytest.mark.parametrize("sb", [False, True], ids=["exact-grad", "sample_backward"])
def test_no_call_violates_a_cuda_precondition(preset, shape, cl, amp, sb, monkeypatch):
    """A training step of a transformed Conv->BN model in every configuration, with every sampled site forced onto
    the CUDA path (the emulated primitives assert their preconditions) and every aten call recorded: no
    ``native_batch_norm_backward`` with undefined save tensors (CUDA asserts ``save_mean->defined()`` there)."""
    import fxbns

    monkeypatch.setattr(dispatch, "MIN_VALUES_PER_CHANNEL", 2)
    import fxbns.modules

    def forced(x, w, n, r):  # every single-group call that CUDA would take: the CUDA path (not the CPU one)
        return "cuda" if n == 1 and x.dtype in (torch.float32, torch.float64, torch.bfloat16) else "reference"

    monkeypatch.setattr(ops, "choose_path", forced)
    monkeypatch.setattr(fxbns.modules, "choose_path", forced)
    nd = len(shape)
    conv = {2: nn.Linear(shape[1], shape[1]), 4: nn.Conv2d(shape[1], shape[1], 3, padding=1),
            5: nn.Conv3d(shape[1], shape[1], 3, padding=1)}[nd]
    bn = {2: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[nd](shape[1])
    model = nn.Sequential(conv, bn, nn.ReLU(), copy.deepcopy(conv), copy.deepcopy(bn))
    pol = fxbns.Policy.from_preset(preset).set_min_elements(0)
    if sb:
        pol.set_sample_backward()
    x = torch.randn(shape)
    if cl:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    gm = fxbns.transform(model, pol, example_inputs=x)
    gm.train()
    cuda_primitives.CALLS.clear()
    with _Recorder() as rec, torch.autocast("cpu", dtype=amp, enabled=amp is not None):
        out = gm(x)
        out.float().sum().backward()
    for f, args, _ in rec.calls:
        if f.__name__.startswith("native_batch_norm_backward"):
            assert args[5] is not None and args[6] is not None, "native_batch_norm_backward with save_mean=None"
    if preset != "micro":  # micro at batch 2 pools virtual rows: several groups, the reference op
        assert any(n == "batch_norm_stats" for n, _ in cuda_primitives.CALLS)


def test_statistical_rule_small_samples_stay_exact():
    """A sample of fewer than MIN_VALUES_PER_CHANNEL values per channel keeps exact statistics on every device."""
    k = dispatch.MIN_VALUES_PER_CHANNEL
    fs = FeatureSampling()  # 1/16 of the map: one value per channel on 1x16x4x4
    assert exact_reason(fs, (1, 16, 4, 4), "cpu") == f"sample under {k} values per channel"
    assert exact_reason(fs, (1, 16, 4, 4), "cuda") == f"sample under {k} values per channel"
    assert exact_reason(BatchSampling(min_samples=1), (64, 8, 1, 1), "cuda") is not None
    assert exact_reason(fs, (64, 16, 32, 32), "cuda") is None  # 64 x 64 values
    assert exact_reason(fs, (1, 16, 1, 1), "cpu") == "one value per channel"
    # the outputs nn.BatchNorm gives, not 1000x too large
    for spec, shape in [(fs, (1, 16, 4, 4)), (BatchSampling(min_samples=1), (8, 16, 1, 1)),
                        (FeatureSampling(patch=(1, 2)), (1, 4, 4, 4))]:
        bn = nn.BatchNorm2d(shape[1])
        sbn = SampledBatchNorm.from_batchnorm(copy.deepcopy(bn), spec)
        x = torch.randn(shape)
        torch.testing.assert_close(sbn(x), bn(x))
        assert sbn.last_runs == "exact"
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        SampledBatchNorm.from_batchnorm(nn.BatchNorm1d(4), BatchSampling())(torch.randn(1, 4))


def test_rule_and_speed_table_are_separate():
    rule_cpu, rule_cuda = dispatch.speed_rule("cpu"), dispatch.speed_rule("cuda")
    assert rule_cpu.measured and not rule_cuda.measured  # CUDA: a stated default until gpu-check measures it
    spec = FeatureSampling(area_ratio=1 / 16, layout="band", per_sample=True, min_elements=None)
    shape = (32, 64, 16, 16)  # 2**19 elements
    assert exact_reason(spec, shape, "cpu") is None
    assert exact_reason(spec, shape, "cuda") is not None  # below the CUDA default 2**22
    assert exact_reason(spec, shape, "mps") is None  # no speed rule: only the statistical rule applies
    assert exact_reason(dataclass_replace(spec, min_elements=0), shape, "cuda") is None


def dataclass_replace(spec, **kw):
    import dataclasses

    return dataclasses.replace(spec, **kw)


def test_dispatch_choice():
    x = torch.randn(4, 3, 8, 8)
    w = torch.ones(3)
    assert dispatch.choose_path(x, w, 1, w) == "cpu"
    assert dispatch.choose_path(x, w, 2, w) == "reference"  # pooled groups (VDN mixing)
    assert dispatch.choose_path(x.bfloat16(), w, 1, w) == "reference"  # the CPU path is fp32/fp64 only
    assert dispatch.choose_path(x.to("meta"), w.to("meta"), 1, None) == "reference"
    assert dispatch.choose_path(x.double(), w, 1, w) == "reference"  # weight in another dtype
    assert dispatch.choose_path(x, None, 1, None) == "cpu"  # no affine, no running statistics
    assert dispatch.choose_path(x, w, 1, w.double()) == "reference"  # running statistics in another dtype


def test_dispatch_choice_on_cuda_tensors():
    """The CUDA rule, on fake CUDA tensors (no GPU needed): SyncBatchNorm's primitives for fp16/bf16/fp32/fp64
    inputs with the weight in the accumulation dtype or absent, and running statistics accumulating in it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    f16, bf16, f32, f64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
    with FakeTensorMode():
        def t(dtype, *shape):
            return torch.empty(shape or (3,), device="cuda", dtype=dtype)

        choose = dispatch.choose_path
        for dt in (f16, bf16, f32):
            assert choose(t(dt, 4, 3, 8, 8), t(f32), 1, t(f32)) == "cuda", dt  # AMP: fp32 parameters
            assert choose(t(dt, 4, 3, 8, 8), None, 1, None) == "cuda", dt
        assert choose(t(f64, 4, 3, 8, 8), t(f64), 1, t(f64)) == "cuda"
        assert choose(t(bf16, 4, 3, 8, 8), t(f32), 1, t(bf16)) == "cuda"  # bf16 running stats accumulate in fp32
        assert choose(t(f32, 4, 3, 8, 8), t(f32), 2, t(f32)) == "reference"  # pooled groups
        assert choose(t(f16, 4, 3, 8, 8), t(f16), 1, t(f32)) == "reference"  # a .half() model's fp16 weight
        assert choose(t(f64, 4, 3, 8, 8), t(f32), 1, t(f64)) == "reference"  # weight in another accumulation dtype
        assert choose(t(f64, 4, 3, 8, 8), t(f64), 1, t(f32)) == "reference"  # running stats in another one
        assert choose(t(f32, 4, 3, 8, 8), None, 1, t(f64)) == "reference"
        assert choose(t(torch.float8_e4m3fn, 4, 3, 8, 8), None, 1, None) == "reference"  # not a CUDA BN dtype


@pytest.mark.parametrize("spec", [BatchSampling(ratio=0.25), FeatureSampling(area_ratio=1 / 4, layout="band",
                                                                             per_sample=True),
                                  BatchSampling(ratio=0.25, sample_backward=True)], ids=lambda s: s.describe())
@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_recompute_sees_the_forwards_sample(spec, reentrant):
    """torch.utils.checkpoint re-runs the forward in the backward: it must see the same sample, and update the
    running statistics once, so gradients and statistics equal the run without checkpointing."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
    block[1] = SampledBatchNorm.from_batchnorm(block[1], spec)
    x = torch.randn(16, 8, 16, 16, requires_grad=True)
    results = []
    for ck in (False, True):
        blk = copy.deepcopy(block)
        xx = x.detach().clone().requires_grad_()
        for _ in range(2):
            out = checkpoint(blk, xx, use_reentrant=reentrant) if ck else blk(xx)
            out.square().mean().backward()
        results.append((xx.grad, blk[0].weight.grad, blk[1].weight.grad, blk[1].running_mean.clone(),
                        blk[1].running_var.clone(), int(blk[1].num_batches_tracked)))
    for a, b in zip(results[0], results[1]):
        if isinstance(a, int):
            assert a == b
        else:
            torch.testing.assert_close(a, b)


def test_replica_and_graph_capture_draw_on_the_device():
    """A DataParallel replica (rebuilt each step, its host counter never advancing) draws from the device counter."""
    bn = SampledBatchNorm.from_batchnorm(nn.BatchNorm2d(4), BatchSampling(ratio=0.25))
    bn._is_replica = True
    x = torch.randn(16, 4, 8, 8)
    means = []
    for _ in range(3):
        rep = copy.copy(bn)  # what replicate() does: a shallow copy sharing the buffers
        rep(x)
        means.append(bn.running_mean.clone())
    assert int(bn.num_batches_tracked) == 3
    deltas = [means[0], means[1] - means[0] * 0.9, means[2] - means[1] * 0.9]
    assert not torch.allclose(deltas[1], deltas[2])  # different samples on different steps


def test_moments_in_fp32_for_half_inputs():
    x = torch.randn(8, 4, 6, 6).bfloat16() * 100 + 1000
    groups = build_groups(BatchSampling(ratio=0.5), tuple(x.shape), 8, 0, torch.tensor(0), 0, host_step=0)
    mean, var = sample_moments(x, groups)
    assert mean.dtype == torch.float32 and var.dtype == torch.float32
    xs = gather(x, groups[0]).double()
    torch.testing.assert_close(var.double(), xs.var((0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-3)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["nchw", "cl", "nc"])
@pytest.mark.parametrize("sb", [False, True], ids=["exact-grad", "sample_backward"])
@pytest.mark.parametrize("spec", SPECS[:3], ids=lambda s: s.describe())
def test_real_cuda_kernels_equal_reference(dtype, layout, sb, spec):
    shape = SHAPES[layout]
    x, w, b, dy = _case(shape, layout, dtype, "cuda")
    groups = build_groups(spec, shape, shape[0], 0, torch.tensor(3, device="cuda"), 4, host_step=3)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    _compare(_run("reference", x, w, b, groups, sb, dy), _run("cuda", x, w, b, groups, sb, dy), tol)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_layer_trains_under_autocast_channels_last():
    bn = SampledBatchNorm.from_batchnorm(nn.BatchNorm2d(32), FeatureSampling(
        area_ratio=1 / 16, layout="band", per_sample=True, sample_backward=True)).cuda()
    x = torch.randn(64, 32, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last).requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = bn(x.bfloat16())
    y.float().square().mean().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(bn.weight.grad).all() and bn.last_runs == "sampled"


def test_big_layer_math_unchanged_by_statistical_rule():
    """Layers far above the rule sample; their outputs differ from exact BatchNorm's (a real estimate)."""
    bn = nn.BatchNorm2d(8)
    sbn = SampledBatchNorm.from_batchnorm(copy.deepcopy(bn), FeatureSampling(area_ratio=1 / 16, layout="band",
                                                                              per_sample=True))
    x = torch.randn(32, 8, 16, 16)
    y = sbn(x)
    assert sbn.last_runs == "sampled" and not torch.allclose(y, bn(x), atol=1e-4)
    assert math.isclose(float(y.mean()), 0.0, abs_tol=0.2)


def test_exact_spec_reason():
    assert exact_reason(Exact(), (8, 4, 4, 4)) == "exact estimator"


@pytest.mark.parametrize("per_row,area,applies", [(8, 1 / 16, False), (128, 1 / 16, False), (8, 1 / 4, False),
                                                  (128, 1 / 4, True), (64, 1 / 4, True), (63, 1 / 4, False)])
def test_sample_backward_floor(per_row, area, applies):
    """sample_backward estimates the backward's sums only from samples of at least MIN_SAMPLE_BACKWARD_VALUES
    values per channel and MIN_SAMPLE_BACKWARD_FRACTION of the layer; any other sample takes the exact-gradient
    backward (the same gradients as without it)."""
    assert dispatch.MIN_SAMPLE_BACKWARD_VALUES == 1024 and dispatch.MIN_SAMPLE_BACKWARD_FRACTION == 0.25
    rows = round(1 / area)
    n = 16  # a band of `area`: one row of per_row values per sample, n * per_row values per channel
    x = torch.randn(n, 4, rows, per_row, dtype=torch.float64) * 2 + 1
    dy = torch.randn_like(x)
    grads = []
    for sb in (False, True):
        spec = FeatureSampling(area_ratio=area, layout="band", per_sample=True, sample_backward=sb)
        bn = SampledBatchNorm.from_batchnorm(nn.BatchNorm2d(4).double(), spec, seed=3)
        xi = x.clone().requires_grad_()
        bn(xi).backward(dy)
        grads.append(xi.grad)
        assert spec.values_per_channel(tuple(x.shape)) == n * per_row
    same = torch.allclose(grads[0], grads[1], rtol=0, atol=1e-12)
    assert same is not applies


def test_sample_backward_off_for_batch_sampling():
    """A BS sample never estimates the backward's sums, however large: the gradients with sample_backward are
    those without it (the exact-gradient backward)."""
    x = torch.randn(16, 4, 16, 16, dtype=torch.float64) * 2 + 1  # 1/2 of the rows: 2,048 values per channel
    dy = torch.randn_like(x)
    grads = []
    for sb in (False, True):
        spec = BatchSampling(ratio=0.5, sample_backward=sb)
        assert spec.values_per_channel(tuple(x.shape)) == 2048
        bn = SampledBatchNorm.from_batchnorm(nn.BatchNorm2d(4).double(), spec, seed=3)
        xi = x.clone().requires_grad_()
        bn(xi).backward(dy)
        grads.append(xi.grad)
    assert torch.equal(grads[0], grads[1])
    assert not dispatch.sample_backward_applies(BatchSampling(ratio=0.5, sample_backward=True), 2048, 4096)
    assert dispatch.sample_backward_applies(FeatureSampling(area_ratio=0.5, sample_backward=True), 2048, 4096)


def test_dense_memory_format_names_the_layout_only_of_dense_tensors():
    from fxbns.ops.reference import dense_memory_format as fmt
    cl, cl3, plain = torch.channels_last, torch.channels_last_3d, torch.contiguous_format
    assert fmt(torch.randn(2, 3, 4, 5)) == plain and fmt(torch.randn(2, 3, 4, 5, 6)) == plain
    assert fmt(torch.randn(2, 3, 4, 5).to(memory_format=cl)) == cl
    assert fmt(torch.randn(2, 3, 4, 5, 6).to(memory_format=cl3)) == cl3
    assert fmt(torch.randn(2, 3, 1, 1).to(memory_format=cl)) == plain  # contiguous in both: plain
    assert fmt(torch.randn(2, 3, 8, 8)[:, :, ::2]) == plain  # not dense in any layout
    assert fmt(torch.randn(2, 3, 8, 8, 8)[:, :, ::2]) == plain
    assert fmt(torch.randn(2, 3, 8, 8, 8).to(memory_format=cl3)[:, :, ::2]) == plain
    assert fmt(torch.randn(4, 3)) == plain
