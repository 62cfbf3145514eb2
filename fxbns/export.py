"""ONNX export of the inference model, checked in ONNX Runtime.

>>> import os, tempfile, torch, torchvision, fxbns
>>> gm = fxbns.transform(torchvision.models.resnet18(num_classes=10), "fs")
>>> path = os.path.join(tempfile.mkdtemp(), "r18.onnx")
>>> r = fxbns.export_onnx(gm, torch.randn(2, 3, 32, 32), path)  # doctest: +SKIP
>>> r.max_error < 1e-4  # doctest: +SKIP
True
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import re
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ._io import atomic_path
from .passes.fold import fold as fold_pass

__all__ = ["export_onnx", "ExportResult", "ort_providers", "check_onnx"]


@dataclass
class ExportResult:
    path: str
    exporter: str  # "dynamo" or "torchscript" (the documented fallback)
    providers: list[str]
    max_error: float | None  # max |onnxruntime - pytorch| / max |pytorch| over the checked batches
    nodes_before: int  # FX graph nodes before / after folding (0: not traced)
    nodes_after: int
    bn_folded: int
    onnx_nodes: int
    opset: int
    ir_version: int
    fallback_reason: str | None = None
    checked_batches: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def ort_providers() -> list[str]:
    """CUDA when onnxruntime has it and a GPU is present, otherwise CPU."""
    import onnxruntime as ort

    avail = ort.get_available_providers()
    if "CUDAExecutionProvider" in avail and torch.cuda.is_available():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def check_onnx(path: str) -> None:
    """Raise ``ValueError`` if the file has a training-mode BatchNormalization or no dynamic batch axis."""
    import onnx

    m = onnx.load(path, load_external_data=False)
    for n in m.graph.node:
        if n.op_type == "BatchNormalization":
            for a in n.attribute:
                if a.name == "training_mode" and a.i == 1:
                    raise ValueError(f"{path}: node {n.name!r} is a training-mode BatchNormalization")
    dim0 = m.graph.input[0].type.tensor_type.shape.dim[0]
    if not dim0.dim_param:
        raise ValueError(f"{path}: the first input has a fixed batch size ({dim0.dim_value}), not a dynamic axis")


def _session(path: str, providers: list[str]):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=providers)


def _to_numpy_outputs(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out.detach().cpu().numpy()]
    if isinstance(out, dict):
        return [a for v in out.values() for a in _to_numpy_outputs(v)]
    if isinstance(out, (tuple, list)):
        return [a for v in out for a in _to_numpy_outputs(v)]
    return []


def _export(model: nn.Module, args: tuple, path: str, dynamic_batch: bool, opset: int | None) -> tuple[str, str | None]:
    kw = {} if opset is None else {"opset_version": opset}
    try:
        dyn = None
        if dynamic_batch:
            batch = torch.export.Dim("batch", min=1, max=65536)
            dyn = tuple({0: batch} if isinstance(a, torch.Tensor) and i == 0 else None for i, a in enumerate(args))
        with contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(model, args, path, dynamo=True, dynamic_shapes=dyn, external_data=False, **kw)
        return "dynamo", None
    except Exception as e:  # noqa: BLE001 - fall back to the TorchScript exporter, and say so
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()  # the exporter colours its messages for a terminal
        reason = f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]
    names = [f"input_{i}" for i in range(len(args))]
    dyn_axes = {names[0]: {0: "batch"}} if dynamic_batch else None
    if dyn_axes is not None:
        dyn_axes["output"] = {0: "batch"}
    torch.onnx.export(model, args, path, dynamo=False, input_names=names, output_names=["output"],
                      dynamic_axes=dyn_axes, **({"opset_version": opset} if opset else {"opset_version": 17}))
    return "torchscript", reason


def export_onnx(model: nn.Module, example_inputs, path: str | os.PathLike, *, fold: bool = True,
                dynamic_batch: bool = True, opset: int | None = None, verify: bool = True) -> ExportResult:
    """Export the eval-mode inference model to ONNX (``torch.onnx.export(..., dynamo=True)``).

    If the dynamo exporter fails, the TorchScript exporter is used and ``exporter``/``fallback_reason`` say
    so.  The file is written atomically.

    Args:
        model: a transformed model or any module (not changed).
        example_inputs: an input batch (a tensor or a tuple of positional inputs).
        path: the ``.onnx`` file to write.
        fold: fold Conv->BN pairs first.
        dynamic_batch: a dynamic first axis (``False``: the example's batch size, fixed).
        opset: the ONNX opset (``None``: the exporter's default).
        verify: compare onnxruntime with PyTorch eval on random inputs at batch 1 and a larger batch (a fixed
            batch: at its size), max relative error <= 1e-4, else ``ValueError`` and no file (``False``: no check;
            ``max_error`` is ``None``).

    Returns:
        An :class:`ExportResult`.

    >>> import os, tempfile, torch, fxbns
    >>> m = fxbns.transform(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)), "fs")
    >>> r = fxbns.export_onnx(m, torch.randn(2, 3, 8, 8), os.path.join(tempfile.mkdtemp(), "m.onnx"))
    >>> r.bn_folded, r.max_error < 1e-4
    (1, True)
    """
    import onnx

    path = os.fspath(path)
    args = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    args = tuple(args)
    ref_model = copy.deepcopy(model).eval()
    if getattr(ref_model, "_fxbns", None) is not None:
        from .api import revert
        ref_model = revert(ref_model).eval()
    nodes_before = nodes_after = folded = 0
    export_model = ref_model
    if fold:
        fr = fold_pass(ref_model)
        export_model = fr.module
        nodes_before, nodes_after, folded = fr.nodes_before, fr.nodes_after, len(fr.folded)
    # a batch of 1 would be specialised by the exporter: export with at least 2 rows
    if args and isinstance(args[0], torch.Tensor) and args[0].shape[0] == 1 and dynamic_batch:
        args = (args[0].expand(2, *args[0].shape[1:]).contiguous(),) + args[1:]
    with atomic_path(path) as tmp:
        with torch.no_grad():
            exporter, reason = _export(export_model, args, tmp, dynamic_batch, opset)
        m = onnx.load(tmp, load_external_data=False)
        if dynamic_batch:
            check_onnx(tmp)
        providers = ort_providers()
        sess = _session(tmp, providers)
        max_err = None
        checked: list[int] = []
        if verify:
            max_err = 0.0
            x0 = args[0]
            # a dynamic axis is checked at batch 1 and at one larger than the example's; a fixed one at the example's
            for b in ((1, max(3, x0.shape[0] + 1)) if dynamic_batch else (x0.shape[0],)):
                x = torch.randn((b,) + tuple(x0.shape[1:]), dtype=x0.dtype)
                feed_args = (x,) + args[1:]
                with torch.no_grad():
                    ref = _to_numpy_outputs(ref_model(*feed_args))
                feed = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), feed_args)}
                got = sess.run(None, feed)
                for r, g in zip(ref, got):
                    scale = max(float(abs(r).max()), 1e-12)
                    max_err = max(max_err, float(abs(r - g).max()) / scale)
                checked.append(int(b))
            if max_err > 1e-4:
                raise ValueError(f"onnxruntime output differs from PyTorch eval by {max_err:.2e} (relative) > 1e-4; "
                                 f"the ONNX file was not written")
        result = ExportResult(path, exporter, list(sess.get_providers()), max_err, nodes_before, nodes_after, folded,
                              len(m.graph.node), max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")),
                                                     default=0), m.ir_version, reason, checked)
    return result
