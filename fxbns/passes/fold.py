"""Fold eval-mode BatchNorm into the Conv (or Linear) that feeds it.  Inference only.

With ``s = gamma / sqrt(running_var + eps)``: ``W' = W * s`` (per output channel) and
``b' = (b - running_mean) * s + beta``.

>>> import torch
>>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
>>> r = fold(m)
>>> r.folded
['1']
>>> torch.allclose(r.module(torch.ones(1, 3, 5, 5)), m(torch.ones(1, 3, 5, 5)), atol=1e-6)
True
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["fold", "FoldResult"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class FoldResult:
    module: nn.Module  # the folded inference model (eval mode)
    folded: list[str] = field(default_factory=list)  # BN names folded away
    skipped: dict[str, str] = field(default_factory=dict)  # BN name -> why it was kept
    nodes_before: int = 0  # graph nodes before / after (0 when the model could not be traced)
    nodes_after: int = 0


@torch.no_grad()
def _fold_weights(layer: nn.Module, bn: _BatchNorm) -> nn.Module:
    new = copy.deepcopy(layer)
    w = new.weight
    s = bn.running_var.to(torch.float64).add(bn.eps).rsqrt()
    if bn.weight is not None:
        s = s * bn.weight.to(torch.float64)
    shift = -bn.running_mean.to(torch.float64) * s
    if bn.bias is not None:
        shift = shift + bn.bias.to(torch.float64)
    b = new.bias.to(torch.float64) * s + shift if new.bias is not None else shift
    new.weight = nn.Parameter((w.to(torch.float64) * s.reshape([-1] + [1] * (w.ndim - 1))).to(w.dtype),
                              requires_grad=w.requires_grad)
    new.bias = nn.Parameter(b.to(w.dtype), requires_grad=w.requires_grad)
    return new


def fold(model: nn.Module) -> FoldResult:
    """Fold every Conv->BN and Linear->BN pair of an eval-mode model into the Conv/Linear.

    Takes a transformed model or any module (traced here); the input is not changed.  A pair is
    folded when the producer's output has no other user, the producer module is called once, and the
    BN uses running statistics.  Refuses a model in training mode.

    Args:
        model: an eval-mode model (a transformed one is reverted first).

    Returns:
        A :class:`FoldResult`: the folded ``fx.GraphModule`` and which BatchNorms were folded or kept, and why.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).eval()
    >>> fold(m).folded, fold(m).nodes_after
    (['1'], 4)
    """
    if model.training:
        raise ValueError("fold() is for inference: it bakes the running statistics into the conv weights, "
                         "which is only equivalent in eval mode. Call model.eval() first.")
    from ..api import revert
    from ..tracing import trace

    if getattr(model, "_fxbns", None) is not None:
        model = revert(model)
    if isinstance(model, fx.GraphModule):
        root, graph = model, copy.deepcopy(model.graph)
    else:
        t = trace(model)
        if t.graph is None:
            return FoldResult(copy.deepcopy(model).eval(), skipped={"<root>": f"not traceable: {t.root_error}"})
        root, graph = model, (t.eval_graph if t.eval_graph is not None else t.graph)
    root = copy.deepcopy(root)
    modules = dict(root.named_modules())
    calls: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    res = FoldResult(root, nodes_before=len(graph.nodes))
    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BatchNorm):
            continue
        bn = modules[node.target]
        prod = node.args[0] if node.args else None
        layer = modules.get(prod.target) if isinstance(prod, fx.Node) and prod.op == "call_module" else None
        if not isinstance(layer, (*_CONVS, nn.Linear)):
            res.skipped[node.target] = "not fed by a Conv or Linear"
            continue
        if len(prod.users) != 1 or calls[prod.target] != 1:
            res.skipped[node.target] = f"{prod.target} has other users"
            continue
        if bn.running_mean is None:
            res.skipped[node.target] = "track_running_stats=False: eval uses batch statistics"
            continue
        out_ch = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        if out_ch != bn.num_features:
            res.skipped[node.target] = f"{prod.target} has {out_ch} outputs but the BN has {bn.num_features} channels"
            continue
        root.set_submodule(prod.target, _fold_weights(layer, bn))
        node.replace_all_uses_with(prod)
        graph.erase_node(node)
        res.folded.append(node.target)
    graph.lint()
    gm = fx.GraphModule(root, graph, type(root).__name__)
    gm.eval()
    res.module = gm
    res.nodes_after = len(graph.nodes)
    return res
