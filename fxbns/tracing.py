"""Trace any model with torch.fx, making untraceable submodules opaque leaves instead of failing.

- ``call_module`` nodes keep the module's qualified name as target (``layer1.0.bn1``).
- When tracing fails inside a submodule, that submodule becomes a leaf and tracing is retried; the
  reason is recorded.  If the root's own code cannot be traced, :func:`trace` returns ``None`` and the
  caller falls back to swapping modules in place.
- Code that reads ``self.training`` during tracing (functional dropout, stochastic depth) gets baked
  into a graph, so the model is traced in train *and* eval mode; :attr:`TraceResult.eval_graph` holds the
  eval-mode graph where the two differ.

>>> import torch
>>> t = trace(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)))
>>> [n.target for n in t.graph.nodes if n.op == "call_module"]
['0', '1']
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch.fx as fx
from torch import nn

__all__ = ["trace", "TraceResult"]


class _Tracer(fx.Tracer):
    # buffers become get_attr nodes (not constants baked into the graph), so they stay state
    proxy_buffer_attributes = True

    def __init__(self, leaves: set[str] | frozenset[str] = frozenset()) -> None:
        # (a default: unpickling a whole GraphModule re-traces its code with a no-argument subclass of this)
        super().__init__()
        self.leaves = leaves
        self.fail_path: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaves:
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.fail_path is None:
                try:
                    self.fail_path = self.path_of_module(m)
                except NameError:
                    self.fail_path = None
            raise


@dataclass
class TraceResult:
    graph: fx.Graph | None  # training-mode graph (None: the root could not be traced)
    eval_graph: fx.Graph | None  # eval-mode graph when it differs from the training one
    opaque: dict[str, str] = field(default_factory=dict)  # qualname -> why it is a leaf
    root_error: str | None = None


def _first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:200]


def _trace_mode(model: nn.Module, leaves: set[str], opaque: dict[str, str], concrete_args) -> fx.Graph | str:
    for _ in range(len(list(model.modules())) + 1):
        tracer = _Tracer(leaves)
        try:
            return tracer.trace(model, concrete_args=concrete_args)
        except Exception as e:  # noqa: BLE001 - any tracing failure is handled the same way
            path = tracer.fail_path
            if not path or path in leaves:
                return _first_line(e)
            leaves.add(path)
            opaque[path] = _first_line(e)
    return "tracing did not converge"


def trace(model: nn.Module, leaf_modules: Iterable[str] = (), concrete_args=None) -> TraceResult:
    """Trace ``model`` in train and eval mode (restoring its mode after)."""
    leaves = set(leaf_modules)
    opaque = {name: "listed in leaf_modules" for name in leaves}
    modes = {m: m.training for m in model.modules()}  # the root included
    try:
        model.train(True)
        g_train = _trace_mode(model, leaves, opaque, concrete_args)
        if isinstance(g_train, str):
            return TraceResult(None, None, opaque, g_train)
        model.train(False)
        g_eval = _trace_mode(model, leaves, opaque, concrete_args)
        if isinstance(g_eval, str):
            return TraceResult(None, None, opaque, g_eval)
    finally:
        for m, t in modes.items():
            m.training = t
    same = g_train.python_code("self").src == g_eval.python_code("self").src
    return TraceResult(g_train, None if same else g_eval, opaque)
