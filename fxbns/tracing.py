"""Trace any model with torch.fx, making untraceable submodules opaque leaves instead of failing.

- ``call_module`` nodes keep the module's qualified name as target (``layer1.0.bn1``).
- When tracing fails inside a submodule, that submodule becomes a leaf and tracing is retried; the
  reason is recorded.  If the root's own code cannot be traced, :func:`trace` returns ``None`` and the
  caller falls back to swapping modules in place.
- Code that reads ``self.training`` during tracing (functional dropout, stochastic depth) gets baked
  into a graph, so the model is traced in train *and* eval mode; if the graphs differ, a
  :class:`DualGraphModule` switches between them on ``.train()`` / ``.eval()``.

>>> import torch
>>> t = trace(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)))
>>> [n.target for n in t.graph.nodes if n.op == "call_module"]
['0', '1']
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

__all__ = ["trace", "TraceResult", "DualGraphModule"]


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


class DualGraphModule(fx.GraphModule):
    """A GraphModule with one graph for training and one for eval, switched by ``.train()``.

    With ``eval_graph=None`` both modes share one graph.  Unlike a plain GraphModule, a deep copy
    keeps both graphs and the fxbns metadata (``_fxbns``).
    """

    def __init__(self, root: nn.Module, train_graph: fx.Graph, eval_graph: fx.Graph | None, class_name: str) -> None:
        super().__init__(root, train_graph, class_name)
        if eval_graph is None:
            eval_graph = train_graph
        for node in eval_graph.nodes:
            if node.op in ("call_module", "get_attr") and not _has_path(self, node.target):
                _copy_path(root, self, node.target)
        # tensor constants the tracer lifted out of the code are not state: keep state_dict keys as the original's
        for mod in self.modules():
            for name in mod._buffers:
                if name.startswith("_tensor_constant"):
                    mod._non_persistent_buffers_set.add(name)
        self._fxbns_graphs = {True: train_graph, False: eval_graph}
        # state_dict metadata carries the root's _version (MNASNet, for one, converts old layouts on load)
        type(self)._version = getattr(type(root), "_version", 1)
        self.train(root.training)

    def train(self, mode: bool = True):
        graphs = self.__dict__.get("_fxbns_graphs")
        if graphs is not None and self.graph is not graphs[mode]:
            self.graph = graphs[mode]
            self.recompile()
        return super().train(mode)

    def graphs(self) -> dict[bool, fx.Graph]:
        """``{True: training graph, False: eval graph}`` (the same object when they do not differ)."""
        return self._fxbns_graphs

    def __deepcopy__(self, memo):
        res = super().__deepcopy__(memo)
        type(res)._version = type(self)._version
        for key in ("_fxbns_graphs", "_fxbns"):
            if key in self.__dict__:
                res.__dict__[key] = copy.deepcopy(self.__dict__[key], memo)
        return res


def _has_path(m: nn.Module, target: str) -> bool:
    obj = m
    for p in target.split("."):
        if not hasattr(obj, p):
            return False
        obj = getattr(obj, p)
    return True


def _copy_path(src: nn.Module, dst: nn.Module, target: str) -> None:
    *prefix, last = target.split(".")
    s, d = src, dst
    for p in prefix:
        s = getattr(s, p)
        if not hasattr(d, p):
            setattr(d, p, nn.Module())
        d = getattr(d, p)
    v = getattr(s, last)
    if isinstance(v, nn.Module):
        d.add_module(last, v)
    elif isinstance(v, nn.Parameter):
        d.register_parameter(last, v)
    elif isinstance(v, torch.Tensor):
        d.register_buffer(last, v)
    else:
        setattr(d, last, v)
