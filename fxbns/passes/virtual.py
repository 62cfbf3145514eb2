"""Virtual batch injection: in training, concatenate fixed virtual samples at the model input and strip
their rows from every output.  Eval does none of this.

The virtual samples are a persistent buffer (``_fxbns_virtual.samples`` in the state dict), created
once with the input's shape (from example inputs or the first batch), so a reloaded model trains
identically.

>>> import torch
>>> vb = VirtualBatch(num_samples=2, threshold=None)
>>> x_cat, n_real, n_total = vb(torch.randn(3, 1, 4, 4))
>>> tuple(x_cat.shape), n_real, n_total
((5, 1, 4, 4), 3, 5)
>>> strip_virtual({"out": x_cat * 2}, n_real, n_total)["out"].shape[0]
3
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn

from ..modules import VirtualState

__all__ = ["VirtualBatch", "strip_virtual", "inject_graph", "VIRTUAL_NAME"]

VIRTUAL_NAME = "_fxbns_virtual"


class VirtualBatch(nn.Module):
    """Returns ``(input with virtual rows appended, n_real, n_total)``; a no-op in eval.

    ``threshold=None``: inject at every training batch (VDN sites in the plan); an int: only when the
    batch has at most that many rows (micro-batch regime only).
    """

    def __init__(self, num_samples: int, threshold: int | None, distribution: str = "normal", seed: int = 0) -> None:
        super().__init__()
        self.num_samples = num_samples
        self.threshold = threshold
        self.distribution = distribution
        self.seed = seed
        self.state = VirtualState()
        self.register_buffer("samples", torch.empty(0))

    def extra_repr(self) -> str:
        when = "every training batch" if self.threshold is None else f"training batches of <= {self.threshold}"
        return f"num_samples={self.num_samples}, distribution={self.distribution!r}, injected at {when}"

    @torch.no_grad()
    def materialize(self, x: torch.Tensor) -> None:
        """Create the virtual samples for inputs like ``x`` (called once)."""
        g = torch.Generator().manual_seed(self.seed)
        base = torch.randn((self.num_samples,) + tuple(x.shape[1:]), generator=g)
        if x.device.type == "meta":
            base = base.to("meta")
        base = base.to(device=x.device, dtype=x.dtype if x.is_floating_point() else torch.float32)
        if self.distribution == "data" and x.ndim >= 2 and x.device.type != "meta":
            dims = [0] + list(range(2, x.ndim))
            xf = x.float()
            mean = xf.mean(dims)
            std = xf.std(dims) if xf.numel() // xf.shape[1] > 1 else torch.ones_like(mean)
            shape = [1, -1] + [1] * (x.ndim - 2)
            base = (base * std.reshape(shape) + mean.reshape(shape)).to(base.dtype)
        self.samples = base

    def forward(self, x: torch.Tensor):
        n = x.shape[0]
        if not self.training or (self.threshold is not None and n > self.threshold):
            self.state.n_real = None
            return x, n, n
        if self.samples.numel() == 0:
            self.materialize(x)
        if tuple(self.samples.shape[1:]) != tuple(x.shape[1:]):
            raise ValueError(
                f"the virtual samples have shape {tuple(self.samples.shape[1:])} per row but this training input has "
                f"{tuple(x.shape[1:])}; VDN needs a fixed input size (resize inputs, or use the bs/fs presets)")
        self.state.n_real = n
        return torch.cat([x, self.samples.to(x.dtype)], 0), n, n + self.num_samples

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        key = prefix + "samples"
        if key in state_dict:
            self.samples = state_dict[key].detach().clone().to(self.samples.device)
        # a state dict of the original model has no virtual samples: keep (or lazily create) ours


def strip_virtual(obj, n_real: int, n_total: int):
    """Drop the virtual rows from every tensor of ``obj`` (tensors, tuples, lists, dicts, namedtuples)."""
    if n_total == n_real:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj[:n_real] if obj.ndim >= 1 and obj.shape[0] == n_total else obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(strip_virtual(o, n_real, n_total) for o in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(strip_virtual(o, n_real, n_total) for o in obj)
    if isinstance(obj, dict):
        return type(obj)((k, strip_virtual(v, n_real, n_total)) for k, v in obj.items())
    return obj


torch.fx.wrap("strip_virtual")


def inject_graph(graph: fx.Graph, input_name: str | None) -> fx.Node:
    """Insert ``x, n_real, n_total = self._fxbns_virtual(x)`` after the inputs and strip the output.

    Returns the ``n_real`` node, to be passed to every site.
    """
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if not placeholders:
        raise ValueError("the model has no inputs to inject a virtual batch into")
    if input_name is not None:
        found = [p for p in placeholders if p.target == input_name or p.name == input_name]
        if not found:
            raise ValueError(f"policy input {input_name!r} is not an input of the model; inputs: "
                             f"{', '.join(p.target for p in placeholders)}")
        x = found[0]
    else:
        x = placeholders[0]
    last_ph = placeholders[-1]
    with graph.inserting_after(last_ph):
        inj = graph.create_node("call_module", VIRTUAL_NAME, (x,), name="fxbns_virtual")
    with graph.inserting_after(inj):
        xv = graph.create_node("call_function", operator.getitem, (inj, 0), name=f"{x.name}_with_virtual")
    with graph.inserting_after(xv):
        n_real = graph.create_node("call_function", operator.getitem, (inj, 1), name="n_real")
    with graph.inserting_after(n_real):
        n_total = graph.create_node("call_function", operator.getitem, (inj, 2), name="n_total")
    x.replace_all_uses_with(xv, delete_user_cb=lambda u: u is not inj)
    out = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(out):
        stripped = graph.call_function(strip_virtual, (out.args[0], n_real, n_total))
    out.args = (stripped,)
    return n_real
