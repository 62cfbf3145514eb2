"""Synchronized statistics over torch.distributed: 2 processes, gloo on 127.0.0.1, each test bounded in time.

Every worker builds the *whole* (concatenated) batch from a shared seed, takes its own rank's slice, runs the
distributed code, and checks it against a single-process reference on the union computed in the same worker.
A worker that fails raises (its traceback is reported); the harness terminates the others after a timeout, and
gloo's own collective timeout keeps a rank from waiting forever on a dead peer.
"""

from __future__ import annotations

import datetime
import os
import socket
import time

import cuda_primitives
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import fxbns
import fxbns.modules
from fxbns.distributed import rank_seed
from fxbns.estimators import BatchSampling, Exact, FeatureSampling
from fxbns.modules import SampledBatchNorm, site_seed
from fxbns.ops import dispatch
from fxbns.ops.sync import synchronized_batch_norm
from fxbns.sampling import build_groups, gather

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2
TIMEOUT_S = 180  # per test, for both processes together (start-up included)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, fn, port: int, args: tuple) -> None:
    torch.set_num_threads(1)
    # the arithmetic on small test inputs: samples of a few values per channel (as the tiny_samples fixture does)
    dispatch.MIN_VALUES_PER_CHANNEL = 2
    cuda_primitives.install()  # SyncBatchNorm's CUDA primitives, emulated on the CPU (path="cuda")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn, *args, timeout: float = TIMEOUT_S) -> None:
    """Run ``fn(rank, *args)`` in ``WORLD`` spawned processes; re-raise the first failure; never hang."""
    ctx = mp.spawn(_worker, args=(fn, _free_port(), args), nprocs=WORLD, join=False)
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{fn.__name__}: the ranks did not finish within {timeout:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)


# -- the op, against autograd on the union --------------------------------------------------------------------

def _sizes(kind: str) -> list[int]:
    return {"even": [4, 4], "uneven": [2, 3], "empty": [0, 5]}[kind]


def _slice(t: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
    start = sum(sizes[:rank])
    return t[start:start + sizes[rank]]


def _union_mask(shape, groups_per_rank, sizes) -> torch.Tensor:
    """The union's sample as a mask of the concatenated batch's shape (the same positions in every channel)."""
    masks = []
    for r, g in enumerate(groups_per_rank):
        n = sizes[r]
        local = (n, *shape[1:])
        idx = torch.arange(torch.Size(local).numel()).view(local)
        m = torch.zeros(local, dtype=torch.bool)
        m.view(-1)[gather(idx, g[0]).reshape(-1)] = True
        masks.append(m)
    return torch.cat(masks)


def _draw(spec, shape, n, rank, seed=11):
    if n == 0 or isinstance(spec, Exact):
        return build_groups(Exact(), (n, *shape[1:]), n, 0, torch.tensor(0), 0)
    return build_groups(spec, (n, *shape[1:]), n, 0, torch.tensor(3), rank_seed(seed, rank))


def _w_op(rank, spec, kind, sample_backward, path):
    torch.manual_seed(0)
    sizes = _sizes(kind)
    shape = (sum(sizes), 3, 6, 5)
    x_all = torch.randn(shape, dtype=torch.float64) * 2 + 1
    r_all = torch.randn(shape, dtype=torch.float64)
    w0, b0 = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    groups = [_draw(spec, shape, n, r) for r, n in enumerate(sizes)]
    eps = 1e-5
    # distributed
    x = _slice(x_all, sizes, rank).clone().requires_grad_()
    w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    y = synchronized_batch_norm(x, w, b, groups[rank][0], eps, sample_backward, None, rm, rv, 1.0, path=path)
    (y * _slice(r_all, sizes, rank)).sum().backward()
    gw, gb = w.grad.clone(), b.grad.clone()
    dist.all_reduce(gw)
    dist.all_reduce(gb)
    # reference on the union
    mask = _union_mask(shape, groups, sizes).expand(shape)
    xr = x_all.clone().requires_grad_()
    wr, br = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    cnt = mask[:, 0].sum()
    dims = (0, 2, 3)
    m_ref = (xr * mask).sum(dims) / cnt
    v_ref = (((xr - m_ref.view(1, -1, 1, 1)) * mask) ** 2).sum(dims) / cnt
    yr = (xr - m_ref.view(1, -1, 1, 1)) * torch.rsqrt(v_ref + eps).view(1, -1, 1, 1) * wr.view(1, -1, 1, 1) \
        + br.view(1, -1, 1, 1)
    torch.testing.assert_close(rm, m_ref.detach())  # momentum 1: the union's mean and unbiased variance
    torch.testing.assert_close(rv, v_ref.detach() * cnt / (cnt - 1))
    torch.testing.assert_close(y, _slice(yr, sizes, rank).detach())
    if not sample_backward:  # the exact gradient of the sampled-statistics function: autograd on the union
        (yr * r_all).sum().backward()
        dx_ref, gw_ref, gb_ref = xr.grad, wr.grad, br.grad
    else:  # BatchNorm's backward fed the union's statistics and the union's sample sums, on every element
        with torch.no_grad():
            invstd = torch.rsqrt(v_ref + eps).view(1, -1, 1, 1)
            xhat = (x_all - m_ref.view(1, -1, 1, 1)) * invstd
            s_dy = (r_all * mask).sum(dims).view(1, -1, 1, 1)
            s_dyx = (r_all * xhat * mask).sum(dims).view(1, -1, 1, 1)
            dx_ref = w0.view(1, -1, 1, 1) * invstd * (r_all - s_dy / cnt - xhat * s_dyx / cnt)
            full = x_all.numel() // 3
            gw_ref, gb_ref = s_dyx.view(-1) * full / cnt, s_dy.view(-1) * full / cnt
    torch.testing.assert_close(x.grad, _slice(dx_ref, sizes, rank))
    torch.testing.assert_close(gw, gw_ref)
    torch.testing.assert_close(gb, gb_ref)


OP_CASES = [
    (Exact(), "even", False),
    (Exact(), "uneven", False),
    (Exact(), "empty", False),
    (BatchSampling(ratio=0.5, min_samples=1), "uneven", False),
    (FeatureSampling(area_ratio=0.25, layout="band", per_sample=True), "even", False),
    (FeatureSampling(patch=(3, 2), per_sample=True), "empty", False),
    (FeatureSampling(area_ratio=0.25, layout="band", per_sample=True), "uneven", True),
    (BatchSampling(ratio=0.5, min_samples=1), "empty", True),
]


def _w_op_cases(rank, cases):
    for path in ("reference", "cuda"):
        cuda_primitives.CALLS.clear()
        for spec, kind, sb in cases:
            try:
                _w_op(rank, spec, kind, sb, path)
            except Exception as e:
                raise AssertionError(f"case {spec.describe()}, {kind} batches, sample_backward={sb}, "
                                     f"path {path}: {e}") from e
        names = {n for n, _ in cuda_primitives.CALLS}
        if path == "cuda":  # the CUDA primitives ran (emulated, preconditions checked on every call)
            assert {"batch_norm_stats", "batch_norm_elemt", "batch_norm_backward_reduce",
                    "batch_norm_backward_elemt"} <= names, names
        else:
            assert not names, names


def test_op_matches_the_union():
    """Outputs, statistics, count, input and parameter gradients (summed over ranks) against the union's
    reference: exact and sampled, even, uneven and empty batches, both backward forms, on the plain-ops path and on
    the CUDA primitives (emulated here; one spawn: start-up dominates)."""
    run_ranks(_w_op_cases, OP_CASES)


# -- transformed models -----------------------------------------------------------------------------------------

class SmallCNN(nn.Module):
    def __init__(self, sync_bn: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.bn2 = nn.SyncBatchNorm(6) if sync_bn else nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5)
        self.bn3 = nn.BatchNorm1d(5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.bn3(self.fc(x.mean((2, 3))))


def _bn_modules(m: nn.Module) -> dict[str, nn.Module]:
    return {n: b for n, b in m.named_modules() if isinstance(b, nn.modules.batchnorm._BatchNorm)}


def _w_exact_model(rank, kinds):
    """The exact preset with set_sync on 2 ranks equals nn.BatchNorm on the concatenated batch."""
    for kind in kinds:
        sizes = {"even": [3, 3], "uneven": [2, 3], "empty": [0, 4]}[kind]
        torch.manual_seed(1)
        ref = SmallCNN().double()
        gm = fxbns.transform(ref, fxbns.Policy.from_preset("exact").set_sync())
        assert all(isinstance(b, SampledBatchNorm) and b.sync for b in _bn_modules(gm).values()), kind
        x_all = torch.randn(sum(sizes), 2, 5, 4, dtype=torch.float64)
        r_all = torch.randn(sum(sizes), 5, dtype=torch.float64)
        for step in range(2):  # two steps: the running statistics' second update starts from the first's
            x_all = x_all + 0.5
            xr = x_all.clone().requires_grad_()
            ref.zero_grad()
            yr = ref(xr)
            (yr * r_all).sum().backward()
            x = _slice(x_all, sizes, rank).clone().requires_grad_()
            gm.zero_grad()
            y = gm(x)
            (y * _slice(r_all, sizes, rank)).sum().backward()
            msg = f"{kind} batches, step {step}"
            torch.testing.assert_close(y, _slice(yr, sizes, rank).detach(), msg=msg)
            torch.testing.assert_close(x.grad, _slice(xr.grad, sizes, rank), msg=msg)
            for (name, p), (_, pr) in zip(gm.named_parameters(), ref.named_parameters()):
                g = p.grad.clone()
                dist.all_reduce(g)
                torch.testing.assert_close(g, pr.grad, msg=f"{msg}: {name}.grad")
            sd, sr = gm.state_dict(), ref.state_dict()
            assert sd.keys() == sr.keys()
            for name in sr:
                torch.testing.assert_close(sd[name], sr[name], msg=f"{msg}: {name}")


class FunctionalBN(nn.Module):
    """A BatchNorm written as an F.batch_norm call (a functional site: FunctionalBatchNorm)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.rand(c) + 0.5), nn.Parameter(torch.randn(c))
        self.register_buffer("rm", torch.zeros(c))
        self.register_buffer("rv", torch.ones(c))

    def forward(self, x):
        return F.batch_norm(x, self.rm, self.rv, self.weight, self.bias, self.training, 0.1, 1e-5)


def _w_exact_functional(rank):
    sizes = [2, 3]
    torch.manual_seed(4)
    ref = FunctionalBN(3).double()
    gm = fxbns.transform(ref, fxbns.Policy.from_preset("exact").set_sync())
    assert [r["sync"] for r in fxbns.report(gm)] == ["world"]
    x_all = torch.randn(sum(sizes), 3, 4, 4, dtype=torch.float64) + 1
    xr = x_all.clone().requires_grad_()
    (ref(xr) ** 2).sum().backward()
    x = _slice(x_all, sizes, rank).clone().requires_grad_()
    y = gm(x)
    (y ** 2).sum().backward()
    torch.testing.assert_close(x.grad, _slice(xr.grad, sizes, rank))
    g = gm.weight.grad.clone()
    dist.all_reduce(g)
    torch.testing.assert_close(g, ref.weight.grad)
    torch.testing.assert_close(gm.rv, ref.rv)


def _w_exact_all(rank, kinds):
    _w_exact_model(rank, kinds)
    _w_exact_functional(rank)


def test_exact_sync_equals_batchnorm_on_the_concatenated_batch():
    """Outputs, input and parameter gradients, running statistics over two steps: even batches, uneven
    (2 and 3) and one rank empty; and a functional (F.batch_norm) site."""
    run_ranks(_w_exact_all, ["even", "uneven", "empty"])


def _w_sampled_model(rank):
    """A sampled preset with set_sync equals the same estimator on the union of the ranks' samples; a site left
    unsynchronized keeps per-rank statistics; the report says which is which."""
    spec = FeatureSampling(area_ratio=0.25, layout="band", per_sample=True)
    policy = fxbns.Policy(spec, seed=5).set_sync(module_name_regex="0")
    torch.manual_seed(2)
    model = nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(3))
    with torch.no_grad():
        model[0].weight.uniform_(0.5, 1.5)
        model[0].bias.normal_()
    gm = fxbns.transform(model, policy, example_inputs=torch.randn(2, 3, 6, 5))
    site0, site1 = gm.get_submodule("0"), gm.get_submodule("1")
    rows = {r["name"]: r["sync"] for r in fxbns.report(gm)}
    assert rows == {"0": "world", "1": None}, rows
    assert "sync" in str(fxbns.report(gm)) and "1 of 2 sites synchronize" in str(fxbns.report(gm))
    sizes = [3, 2]
    shape = (sum(sizes), 3, 6, 5)
    x_all = torch.randn(shape) * 3 + 2
    r_all = torch.randn(shape)
    x = _slice(x_all, sizes, rank).clone().requires_grad_()
    h = site0(x)  # the synchronized site alone (its output's gradient: r)
    (h * _slice(r_all, sizes, rank)).sum().backward()
    # the draws: each rank draws with its rank folded into the site's seed (rank_seed); the seed itself stays
    seeds = [rank_seed(site_seed("0", 5), r) for r in range(WORLD)]
    assert site0.seed == site_seed("0", 5) and fxbns.modules.rank_seed(site0.seed) == seeds[rank]
    groups = [build_groups(spec, (n, *shape[1:]), n, 0, torch.tensor(0), seeds[r]) for r, n in enumerate(sizes)]
    mask = _union_mask(shape, groups, sizes).expand(shape)
    xr = x_all.clone().requires_grad_()
    w, b = model[0].weight.detach().clone().requires_grad_(), model[0].bias.detach().clone().requires_grad_()
    cnt = mask[:, 0].sum()
    mean = (xr * mask).sum((0, 2, 3)) / cnt
    var = (((xr - mean.view(1, -1, 1, 1)) * mask) ** 2).sum((0, 2, 3)) / cnt
    yr = (xr - mean.view(1, -1, 1, 1)) * torch.rsqrt(var + 1e-5).view(1, -1, 1, 1) * w.view(1, -1, 1, 1) \
        + b.view(1, -1, 1, 1)
    (yr * r_all).sum().backward()
    torch.testing.assert_close(h, _slice(yr, sizes, rank).detach())
    torch.testing.assert_close(x.grad, _slice(xr.grad, sizes, rank))
    gw = site0.weight.grad.clone()
    dist.all_reduce(gw)
    torch.testing.assert_close(gw, w.grad)
    rm = 0.9 * torch.zeros(3) + 0.1 * mean.detach()
    rv = 0.9 * torch.ones(3) + 0.1 * var.detach() * cnt / (cnt - 1)
    torch.testing.assert_close(site0.running_mean, rm)
    torch.testing.assert_close(site0.running_var, rv)
    # the unsynchronized site: this rank's own sample (its seed folded too), no collective
    assert site1.sync is False
    h1 = site1(h.detach())
    g1 = build_groups(spec, tuple(h.shape), sizes[rank], 0, torch.tensor(0), rank_seed(site_seed("1", 5), rank))
    s = gather(h.detach(), g1[0])
    assert s.ndim == 3  # (rows, C, band): one band per row
    m1 = s.mean((0, 2))
    hn = (h.detach() - m1.view(1, -1, 1, 1)) / torch.sqrt(((s - m1.view(1, -1, 1)) ** 2).mean((0, 2)) + 1e-5
                                                         ).view(1, -1, 1, 1)
    torch.testing.assert_close(h1.detach(), hn * site1.weight.view(1, -1, 1, 1) + site1.bias.view(1, -1, 1, 1))


def test_sampled_sync_equals_the_estimator_on_the_union_and_mixing():
    run_ranks(_w_sampled_model)


def _w_ddp(rank, tmpdir):
    """DDP training of a transformed CNN (sampled per-rank sites and a model SyncBatchNorm, now a synchronized
    sampled site): parameters identical across ranks, rank-dependent draws; save/load and revert on the
    unwrapped module."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.manual_seed(0)
    policy = fxbns.Policy(FeatureSampling(area_ratio=0.25, layout="band", per_sample=True))
    gm = fxbns.transform(SmallCNN(sync_bn=True), policy)
    assert [gm.bn1.sync, gm.bn2.sync, gm.bn3.sync] == [False, True, False]
    ddp = DDP(gm)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    for _ in range(3):
        x = torch.randn(4, 2, 6, 6, generator=gen)
        target = torch.randint(0, 5, (4,), generator=gen)
        loss = F.cross_entropy(ddp(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, p in gm.named_parameters():
        both = [torch.empty_like(p) for _ in range(WORLD)]
        dist.all_gather(both, p.detach())
        torch.testing.assert_close(both[0], both[1], rtol=0, atol=0, msg=name)
    seeds = [None] * WORLD
    dist.all_gather_object(seeds, (fxbns.modules.rank_seed(gm.bn1.seed), fxbns.modules.rank_seed(gm.bn2.seed)))
    assert seeds[0][0] != seeds[1][0] and seeds[0][1] != seeds[1][1], seeds  # each rank draws its own samples
    assert seeds[rank] == (rank_seed(site_seed("bn1", 0), rank), rank_seed(site_seed("bn2", 0), rank))
    path = os.path.join(tmpdir, f"rank{rank}.pt")
    fxbns.save(ddp.module, path)
    loaded = fxbns.load(path, SmallCNN(sync_bn=True))
    assert loaded.bn2.sync and not loaded.bn1.sync
    for k, v in gm.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0, msg=k)
    plain = fxbns.revert(ddp.module)
    assert type(plain.bn2) is nn.SyncBatchNorm and type(plain.bn1) is nn.BatchNorm2d
    assert type(plain.bn3) is nn.BatchNorm1d
    assert plain.state_dict().keys() == SmallCNN(sync_bn=True).state_dict().keys()
    gm.eval()
    plain.eval()
    x = torch.randn(3, 2, 6, 6)
    torch.testing.assert_close(plain(x), gm(x), rtol=0, atol=0)


def test_ddp_training_save_load_revert(tmp_path):
    run_ranks(_w_ddp, str(tmp_path))


def _w_bad_group(rank):
    """A synchronizing group without this rank raises a clear error at the first training step (set_sync, and
    a model SyncBatchNorm over such a group); the member rank trains."""
    g = dist.new_group([0])
    x = torch.randn(4, 3, 2, 2)
    for model, policy in [(nn.Sequential(nn.BatchNorm2d(3)), fxbns.Policy.from_preset("exact").set_sync(g)),
                          (nn.Sequential(nn.SyncBatchNorm(3, process_group=g)), "fs")]:
        gm = fxbns.transform(model, policy)  # (a copy of the model: the process group is shared, not copied)
        assert gm.get_submodule("0").process_group is g
        assert fxbns.report(gm).rows[0]["sync"] == ("group(ranks 0)" if rank == 0 else "group(without this rank)")
        if rank == 1:
            with pytest.raises(RuntimeError, match="does not contain this process"):
                gm(x)
        else:
            gm(x).sum().backward()
        gm.eval()
        gm(x)  # eval: running statistics, no collective


def test_process_group_without_this_rank_raises():
    run_ranks(_w_bad_group)


# -- without torch.distributed initialised --------------------------------------------------------------------

def test_sync_is_a_noop_without_an_initialised_process_group():
    assert not dist.is_initialized()
    torch.manual_seed(3)
    ref = SmallCNN()
    gm = fxbns.transform(ref, fxbns.Policy.from_preset("exact").set_sync())
    fs = fxbns.Policy(FeatureSampling(area_ratio=0.25, layout="band", per_sample=True), seed=4)
    a = fxbns.transform(ref, fs)
    b = fxbns.transform(ref, fxbns.Policy.from_dict(fs.to_dict()).set_sync())
    x = torch.randn(6, 2, 5, 5)
    torch.testing.assert_close(gm(x), ref(x))
    torch.testing.assert_close(gm.bn2.running_var, ref.bn2.running_var)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)  # the same samples: no rank folded into the seeds
    assert a.bn1.seed == b.bn1.seed == site_seed("bn1", 4)


def test_policy_sync_round_trip_and_errors():
    p = fxbns.Policy.from_preset("bs").set_sync(module_name_regex=r"layer4\..*")
    d = p.to_dict()
    assert d["sync"] == {"process_group": None, "module_name_regex": r"layer4\..*"}
    q = fxbns.Policy.from_dict(d)
    assert q.sync_for("layer4.0.bn1") and not q.sync_for("layer1.0.bn1")
    assert "sync" not in fxbns.Policy.from_preset("bs").to_dict()
    assert not fxbns.Policy.from_preset("bs").set_sync().set_sync(enabled=False).sync
    with pytest.raises(TypeError, match="ProcessGroup"):
        fxbns.Policy().set_sync([0, 1])
    with pytest.raises(ValueError, match="'sync'"):
        fxbns.Policy.from_dict({"sync": {"process_group": [0, 1]}})
    with pytest.raises(ValueError, match="VirtualDataset statistics cannot be synchronized"):
        fxbns.transform(SmallCNN(), fxbns.Policy(fxbns.VirtualDataset()).set_sync())


def test_convert_sync_batchnorm_after_transform_is_refused():
    gm = fxbns.transform(SmallCNN(), fxbns.Policy.from_preset("fs").set_min_elements(0))
    x = torch.randn(4, 2, 5, 5)
    gm(x)
    copied = __import__("copy").deepcopy(gm)
    nn.SyncBatchNorm.convert_sync_batchnorm(gm)
    assert type(gm.bn1) is nn.SyncBatchNorm
    with pytest.raises(RuntimeError, match=r"replaced after fxbns.transform: bn1 \(now SyncBatchNorm\)"):
        gm(x)
    why = {r["name"]: r["why"] for r in fxbns.report(gm)}
    assert why["bn1"] == "now SyncBatchNorm: replaced after transform", why
    gm.eval()
    gm(x)  # eval runs (what is there is used as it is)
    gm.train()
    nn.SyncBatchNorm.convert_sync_batchnorm(copied)  # a copy keeps the check
    with pytest.raises(RuntimeError, match="replaced after fxbns.transform"):
        copied(x)
    # converted *before* the transform: the SyncBatchNorms become synchronized sampled sites
    gm2 = fxbns.transform(nn.SyncBatchNorm.convert_sync_batchnorm(SmallCNN()), "fs")
    assert all(r["sync"] == "world" for r in fxbns.report(gm2))
    assert isinstance(gm2.bn1, SampledBatchNorm) and gm2.bn1.sync
    assert type(fxbns.revert(gm2).bn1) is nn.SyncBatchNorm


def _w_compile(rank):
    """torch.compile traces a synchronized site without graph breaks and matches eager."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
    policy = fxbns.Policy(FeatureSampling(area_ratio=0.25, layout="band", per_sample=True)).set_sync()
    eager, compiled = fxbns.transform(m, policy), fxbns.transform(m, policy)
    x = torch.randn(2 + rank, 3, 12, 12)
    explained = torch._dynamo.explain(__import__("copy").deepcopy(compiled))(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    c = torch.compile(compiled)
    for _ in range(2):
        x = torch.randn(2 + rank, 3, 12, 12)
        yc, ye = c(x), eager(x)
        yc.square().sum().backward()
        ye.square().sum().backward()
        torch.testing.assert_close(yc, ye, rtol=1e-4, atol=1e-5)
    for p, q in zip(compiled.parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-3)
    for k, v in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[k], v, msg=k)


def test_compiled_sync_matches_eager():
    run_ranks(_w_compile)


# -- on a GPU: the real CUDA primitives and NCCL ---------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and dist.is_nccl_available()), reason="needs a CUDA GPU and NCCL")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("sb", [False, True], ids=["exact-grad", "sample_backward"])
def test_sync_cuda_kernels_on_nccl_equal_reference(dtype, channels_last, sb):
    """One NCCL rank: the synchronized op on SyncBatchNorm's real CUDA kernels against its plain-ops form, for
    fp32 and bf16 inputs with fp32 parameters (AMP), NCHW and channels-last; outputs, gradients, running stats."""
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        shape = (16, 32, 12, 12)
        spec = FeatureSampling(area_ratio=0.25, layout="band", per_sample=True, sample_backward=sb)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x0 = (torch.randn(shape, device="cuda") * 2 + 1).to(dtype).contiguous(memory_format=fmt)
        dy = torch.randn(shape, device="cuda").to(dtype).contiguous(memory_format=fmt)
        w0, b0 = torch.rand(32, device="cuda") + 0.5, torch.randn(32, device="cuda")
        group = build_groups(spec, shape, 16, 0, torch.tensor(3, device="cuda"), 7, host_step=3)[0]
        out = {}
        for path in ("reference", "cuda"):
            x, w, b = x0.clone().requires_grad_(), w0.clone().requires_grad_(), b0.clone().requires_grad_()
            rm, rv = torch.zeros(32, device="cuda"), torch.ones(32, device="cuda")
            y = synchronized_batch_norm(x, w, b, group, 1e-5, sb, None, rm, rv, 0.1, path=path)
            y.backward(dy)
            out[path] = [t.float() for t in (y, x.grad, w.grad, b.grad, rm, rv)]
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        for a, e, name in zip(out["cuda"], out["reference"], ["y", "dx", "dw", "db", "running_mean", "running_var"]):
            torch.testing.assert_close(a, e, rtol=tol, atol=tol, msg=name)
    finally:
        dist.destroy_process_group()
