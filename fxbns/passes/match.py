"""Find every BatchNorm site: graph BN modules (Conv->BN pairs first), functional BN, BNs inside leaves.

>>> import torch
>>> from fxbns.tracing import trace
>>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
>>> [(s.name, s.producer) for s in find_sites(m, trace(m))]
[('1', 'conv')]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _LazyNormBase
from torch.nn.modules.conv import _ConvNd

from ..tracing import TraceResult

__all__ = ["Site", "find_sites", "FUNCTIONAL_BN", "STANDARD_BN"]

FUNCTIONAL_BN = (F.batch_norm, torch.batch_norm)
STANDARD_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class Site:
    """One BatchNorm site and what the plan does with it."""

    name: str  # qualified name of the BN module (functional sites: owner path + ".batch_norm[#k]")
    kind: str  # "module" (graph node), "functional" (F.batch_norm call), "inner" (inside an opaque leaf)
    module_type: str
    producer: str = "other"  # "conv", "linear", "other", "input", "opaque" (unknown: inside a leaf)
    producer_name: str | None = None
    calls: int = 1
    nodes: list[str] = field(default_factory=list)
    shape: tuple[int, ...] | None = None
    spec: Any = None  # planned estimator (None: left exact)
    reason: str | None = None  # why the site stays exact, or notes
    notes: list[str] = field(default_factory=list)
    sync: bool = False  # statistics synchronized across processes (nn.SyncBatchNorm, or Policy.set_sync)
    process_group: Any = None  # the torch.distributed group of a synchronized site (None: WORLD)


def _left_alone_reason(m: nn.Module) -> str | None:
    if isinstance(m, _LazyNormBase) and m.has_uninitialized_params():
        return "uninitialised LazyBatchNorm: pass example_inputs to transform() to materialise it"
    if type(m) not in STANDARD_BN and type(m) is not nn.SyncBatchNorm and isinstance(m, _BatchNorm):
        return (f"{type(m).__name__} subclasses BatchNorm with its own forward (extra behaviour such as a fused "
                f"activation); left exact so that behaviour is kept")
    return None


def _is_frozen(m: nn.Module) -> bool:
    return type(m).__name__ == "FrozenBatchNorm2d"


def _producer(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[str, str | None]:
    if not node.args or not isinstance(node.args[0], fx.Node):
        return "other", None
    p = node.args[0]
    if p.op == "placeholder":
        return "input", p.name
    if p.op == "call_module":
        pm = modules.get(p.target)
        if isinstance(pm, _ConvNd) and len(p.users) == 1:
            return "conv", p.target
        if isinstance(pm, nn.Linear) and len(p.users) == 1:
            return "linear", p.target
        return "other", p.target
    return "other", p.name


def find_sites(model: nn.Module, traced: TraceResult | None) -> list[Site]:
    """All BN sites of ``model`` in graph order, then the ones inside opaque leaves, then left-alone extras."""
    modules = dict(model.named_modules())
    sites: dict[str, Site] = {}
    seen_modules: set[str] = set()
    if traced is not None and traced.graph is not None:
        fcount: dict[str, int] = {}
        for node in traced.graph.nodes:
            if node.op == "call_module":
                m = modules.get(node.target)
                if isinstance(m, _BatchNorm):
                    if node.target in sites:
                        s = sites[node.target]
                        s.calls += 1
                        s.nodes.append(node.name)
                        continue
                    prod, pname = _producer(node, modules)
                    sites[node.target] = Site(node.target, "module", type(m).__name__, prod, pname,
                                              nodes=[node.name], reason=_left_alone_reason(m))
                    seen_modules.add(node.target)
                elif m is not None and node.target in traced.opaque:
                    for sub, sm in m.named_modules(prefix=node.target):
                        if isinstance(sm, _BatchNorm) and sub not in sites:
                            sites[sub] = Site(sub, "inner", type(sm).__name__, "opaque", None,
                                              reason=_left_alone_reason(sm),
                                              notes=[f"inside opaque leaf {node.target!r}: module swapped in place"])
                            seen_modules.add(sub)
            elif node.op == "call_function" and node.target in FUNCTIONAL_BN:
                owner = _owner_of(node)
                k = fcount.get(owner, 0)
                fcount[owner] = k + 1
                name = f"{owner + '.' if owner else ''}batch_norm" + (f"#{k}" if k else "")
                prod, pname = _producer(node, modules)
                sites[name] = Site(name, "functional", node.target.__name__, prod, pname, nodes=[node.name])
    for name, m in modules.items():
        if name in seen_modules:
            continue
        if isinstance(m, _BatchNorm):
            why = _left_alone_reason(m)
            if traced is not None and traced.graph is not None:
                # not called in the traced graph, or hidden inside code FX could not see
                sites[name] = Site(name, "inner", type(m).__name__, "opaque", None, reason=why,
                                   notes=["not reached as a graph node: module swapped in place"])
            else:
                sites[name] = Site(name, "inner", type(m).__name__, "opaque", None, reason=why,
                                   notes=["root not traceable: module swapped in place"])
        elif _is_frozen(m):
            sites[name] = Site(name, "inner", type(m).__name__, "other", None,
                               reason="FrozenBatchNorm2d has fixed statistics; nothing to estimate")
    for s in sites.values():  # a model's SyncBatchNorms: synchronized sites over their own process group
        m = modules.get(s.name)
        if type(m) is nn.SyncBatchNorm and s.reason is None:
            s.sync, s.process_group = True, m.process_group
    return list(sites.values())


def _owner_of(node: fx.Node) -> str:
    """The module path that owns a functional BN call, from its parameter/buffer get_attr arguments."""
    for a in list(node.args[1:]) + list(node.kwargs.values()):
        if isinstance(a, fx.Node) and a.op == "get_attr":
            return a.target.rpartition(".")[0]
    stack = node.meta.get("nn_module_stack")
    if stack:
        last = list(stack.values())[-1]
        return last[0] if isinstance(last, tuple) else str(last)
    return ""
