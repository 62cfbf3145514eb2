"""``fxbns`` / ``python tools/rewrite.py``: rewrite a model's BatchNorms from the shell.

    fxbns                                   # the embedded default (torchvision ResNet-18, 10 classes)
    fxbns weights.pt --arch torchvision:resnet50 --policy fs --onnx model.onnx
    fxbns model.pt --trust --policy policy.yaml --out fxbns.ckpt --report report.json
    fxbns --explain --arch torchvision:mobilenet_v2 --policy bs

Exit codes: 0 success, 1 error (one line, no traceback unless ``--debug``), 2 usage error or a
pickled model without ``--trust``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import pickle
import re
import sys
import time
import warnings
import zipfile

__all__ = ["main"]

DEFAULT_ARCH = "torchvision:resnet18"
DEFAULT_NUM_CLASSES = 10


class CLIError(Exception):
    def __init__(self, msg: str, code: int = 1) -> None:
        super().__init__(msg)
        self.code = code


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fxbns", description="Rewrite every BatchNorm of a PyTorch model into sampled-statistics "
        "BatchNorm (BS / FS / VDN / micro-batch), report per layer, save and export to ONNX.")
    p.add_argument("model", nargs="?", help="a state_dict file (with --arch) or a pickled nn.Module (with --trust); "
                   f"omitted: the embedded default ({DEFAULT_ARCH}, {DEFAULT_NUM_CLASSES} classes)")
    p.add_argument("--arch", help="architecture for a state_dict: torchvision:NAME, timm:NAME (timm installed), "
                   "or package.module:factory")
    p.add_argument("--num-classes", type=int, help="num_classes passed to the architecture factory (default: read "
                   "from a state_dict's classifier for torchvision and timm architectures)")
    p.add_argument("--trust", action="store_true", help="allow loading a pickled nn.Module (runs code from the file)")
    p.add_argument("--policy", default="fs", help="a preset (exact, bs, fs, vdn, micro) or a JSON/YAML policy file "
                   "(default: fs)")
    p.add_argument("--input-shape", help="example input shape N,C,H,W (default 2,3,224,224; 2,3,32,32 for the "
                   "embedded default)")
    p.add_argument("--out", help="write an fxbns checkpoint (fxbns.save) here")
    p.add_argument("--onnx", help="export the inference model to this ONNX file (checked in onnxruntime)")
    p.add_argument("--report", help="write the per-layer report as JSON here")
    p.add_argument("--explain", action="store_true", help="dry run: print the plan, write nothing but --report")
    p.add_argument("--min-elements", type=int, help="layers smaller than this (N*C*max(H*W,16)) keep exact "
                   "statistics; 0 samples every layer (the bs preset uses 262144, fs 524288)")
    p.add_argument("--sample-backward", action="store_true", help="estimate the backward's gradient sums from the "
                   "sample too, on every FS layer of the policy whose sample is at least 1/4 of the layer (less memory "
                   "traffic in the backward; it cost accuracy on a MobileNet-style net, see the README)")
    p.add_argument("--tune", action="store_true", help="time every sampled layer inside training steps on a random "
                   "batch of --input-shape (give your training batch size and image size) with its estimator and "
                   "exact, and keep exact statistics where that was faster on this machine (fxbns.tune)")
    p.add_argument("--tune-steps", type=int, default=10, help="--tune: timed step pairs (default 10)")
    p.add_argument("--calibrate", metavar="FILE", help="choose every layer's sample from the measured correlation of "
                   "its features on real inputs: FILE is a .pt holding one input batch (a tensor) or a list of "
                   "batches, of the training batch size; the calibrated policy replaces --policy (fxbns.calibrate)")
    p.add_argument("--target-error", type=float, help="--calibrate: the largest RMS relative error allowed for each "
                   "layer's batch mean (in std) and variance (default 0.1)")
    p.add_argument("--save-policy", help="write the policy used (tuned with --tune) as JSON or YAML here")
    p.add_argument("--seed", type=int, default=0, help="seed for model init and sampling (default 0)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return p


@contextlib.contextmanager
def _step(msg: str):
    """Show progress for steps that take longer than a second."""
    t0 = time.perf_counter()
    print(f"[fxbns] {msg} ...", file=sys.stderr, flush=True)
    yield
    dt = time.perf_counter() - t0
    if dt > 1.0:
        print(f"[fxbns] {msg}: done in {dt:.1f} s", file=sys.stderr, flush=True)


def _parse_shape(s: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
    if s is None:
        return default
    try:
        shape = tuple(int(v) for v in re.split(r"[,x]", s.strip()))
    except ValueError:
        raise CLIError(f"--input-shape {s!r} is not a list of integers such as 2,3,224,224", 2) from None
    if len(shape) < 2 or any(v <= 0 for v in shape):
        raise CLIError(f"--input-shape {s!r} must have at least 2 positive dims (N,C,...), e.g. 2,3,224,224", 2)
    return shape


def _check_writable(path: str | None, flag: str) -> None:
    if path is None:
        return
    from ._io import check_writable

    try:
        check_writable(path)
    except OSError as e:
        raise CLIError(f"{flag}: {e}") from None


def _build_arch(arch: str, num_classes: int | None):
    if ":" not in arch:
        raise CLIError(f"--arch {arch!r} must be torchvision:NAME, timm:NAME or package.module:factory", 2)
    kind, name = arch.split(":", 1)
    kw = {} if num_classes is None else {"num_classes": num_classes}
    if kind == "torchvision":
        import torchvision

        try:
            return torchvision.models.get_model(name, weights=None, **kw)
        except ValueError:
            names = torchvision.models.list_models()
            import difflib

            close = difflib.get_close_matches(name, names, n=3)
            raise CLIError(f"unknown torchvision model {name!r}" + (f"; did you mean {', '.join(close)}?" if close
                                                                     else "")) from None
    if kind == "timm":
        try:
            import timm
        except ImportError:
            raise CLIError("--arch timm:... needs timm: pip install timm") from None
        return timm.create_model(name, pretrained=False, **kw)
    try:
        mod = importlib.import_module(kind)
        factory = getattr(mod, name)
    except (ImportError, AttributeError) as e:
        raise CLIError(f"--arch {arch!r}: cannot import {name!r} from {kind!r} ({e})") from None
    return factory(**kw)


#: torchvision's classifiers have this many outputs unless told otherwise
_TORCHVISION_CLASSES = 1000


def _classifier_keys(kind: str, model) -> list[str]:
    """State-dict keys of the classifier's weight(s) of a model built with the factory's default classes."""
    sd = model.state_dict()
    if kind == "timm":
        names = getattr(model, "pretrained_cfg", None) or {}
        names = names.get("classifier")
        names = [names] if isinstance(names, str) else list(names or ())
        return [f"{n}.weight" for n in names if f"{n}.weight" in sd]
    # torchvision records no classifier name: the layers with the default number of outputs (and a bias)
    return [k for k, v in sd.items() if k.endswith(".weight") and v.ndim >= 2 and v.shape[0] == _TORCHVISION_CLASSES
            and getattr(sd.get(k[:-6] + "bias"), "shape", None) == (_TORCHVISION_CLASSES,)]


def _classes_in(sd: dict, kind: str, model) -> tuple[int, str] | None:
    """(number of classes, key) when the state dict's classifier has another number of outputs than ``model``'s."""
    msd = model.state_dict()
    keys = [k for k in _classifier_keys(kind, model) if k in sd and sd[k].ndim == msd[k].ndim]
    found = {int(sd[k].shape[0]) for k in keys}
    if len(found) != 1:
        return None
    n = found.pop()
    return (n, keys[0]) if n != msd[keys[0]].shape[0] else None


def _shape(t) -> str:
    return "x".join(map(str, t.shape)) or "scalar"


def _misfit(sd: dict, model) -> str:
    """'N missing, M unexpected keys' (and other shapes), with a few examples of each."""
    msd = model.state_dict()
    missing = [k for k in msd if k not in sd]
    unexpected = [k for k in sd if k not in msd]
    shapes = [k for k in msd if k in sd and tuple(sd[k].shape) != tuple(msd[k].shape)]

    def eg(keys, fmt=str, sep=", "):
        more = f"{sep}..." if len(keys) > 3 else ""
        return f" (e.g. {sep.join(fmt(k) for k in keys[:3])}{more})" if keys else ""

    parts = [f"{len(missing)} missing keys{eg(missing)}", f"{len(unexpected)} unexpected keys{eg(unexpected)}"]
    if shapes:
        parts.append(f"{len(shapes)} with another shape"
                     + eg(shapes, lambda k: f"{k}: {_shape(sd[k])} in the file, {_shape(msd[k])} in the model", "; "))
    return ", ".join(parts)


def _load_model(args):
    from torch import nn

    from ._io import load_error_message, quiet_torch_load

    if args.model is None:
        if args.arch is None:
            return _build_arch(DEFAULT_ARCH, args.num_classes or DEFAULT_NUM_CLASSES), "embedded default"
        return _build_arch(args.arch, args.num_classes), args.arch
    path = args.model
    if not os.path.exists(path):
        raise CLIError(f"model file {path!r} does not exist")
    if os.path.isdir(path):
        raise CLIError(f"model path {path!r} is a folder; give a .pt file")
    try:
        obj = quiet_torch_load(path, weights_only=True)
        safe = True
    except pickle.UnpicklingError as e:
        if "global" not in str(e).lower():  # not a class reference that weights_only refused: a broken file
            raise CLIError(f"cannot read {path!r}: it is not a PyTorch file or it is corrupt (torch.load could "
                           f"not unpickle it)") from None
        obj, safe = None, False
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CLIError(load_error_message(path, e)) from None
    if not safe:
        if not args.trust:
            raise CLIError(
                f"{path!r} holds a pickled object (a whole nn.Module?), not just tensors. Loading it runs code "
                f"from the file. If you trust it, add --trust; otherwise save a state_dict and pass --arch.", 2)
        try:
            obj = quiet_torch_load(path, weights_only=False)
        except Exception as e:  # noqa: BLE001
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise CLIError(f"cannot load {path!r} with --trust ({type(e).__name__}: {first})") from None
        if not isinstance(obj, nn.Module):
            raise CLIError(f"{path!r} holds a {type(obj).__name__}, not an nn.Module")
        return obj, path
    import torch

    if isinstance(obj, dict) and obj.get("format") == "fxbns-checkpoint":
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CLIError(f"{path!r} is not a state_dict (a mapping of names to tensors)")
    if args.arch is None:
        raise CLIError(f"{path!r} is a state_dict: pass --arch (e.g. --arch torchvision:resnet18) to build the model", 2)
    sd = {k: v for k, v in obj.items() if not k.startswith("_fxbns_virtual.")}
    model = _build_arch(args.arch, args.num_classes)
    kind = args.arch.split(":", 1)[0]
    if kind in ("torchvision", "timm") and args.num_classes is None:
        found = _classes_in(sd, kind, model)
        if found is not None:
            print(f"[fxbns] --num-classes {found[0]}: read from the state dict ({found[1]} has {found[0]} outputs)",
                  file=sys.stderr)
            model = _build_arch(args.arch, found[0])
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        detail = _misfit(sd, model)
        if detail.startswith("0 missing keys, 0 unexpected keys") and "another shape" not in detail:
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            detail = "; ".join(lines[1:3])[:300]
        hint = "; check --arch and --num-classes" if args.num_classes is not None else "; check --arch"
        raise CLIError(f"the state_dict in {path!r} does not fit {args.arch}: {detail}{hint}") from None
    return model, f"{path} ({args.arch})"


def run(args) -> int:
    import torch

    import fxbns

    torch.manual_seed(args.seed)
    default_shape = (2, 3, 32, 32) if args.model is None and args.arch is None else (2, 3, 224, 224)
    shape = _parse_shape(args.input_shape, default_shape)
    if args.tune_steps < 1:
        raise CLIError(f"--tune-steps must be >= 1, got {args.tune_steps}", 2)
    for path, flag in ((args.out, "--out"), (args.onnx, "--onnx"), (args.report, "--report"),
                       (args.save_policy, "--save-policy")):
        _check_writable(path, flag)
    try:
        policy = fxbns.policy.resolve_policy(args.policy)
    except (ValueError, TypeError) as e:
        raise CLIError(f"--policy: {e}", 2) from None
    policy.set_seed(args.seed)
    if args.min_elements is not None:
        try:
            policy.set_min_elements(args.min_elements)
        except ValueError as e:
            raise CLIError(f"--min-elements: {e}", 2) from None
    if args.sample_backward:
        if not any(isinstance(s, (fxbns.BatchSampling, fxbns.FeatureSampling)) for s in policy.specs()):
            raise CLIError(f"--sample-backward: policy {args.policy!r} has no BS or FS layer spec to set it on "
                           "(it applies to the bs and fs presets and BS/FS specs in a policy file)", 2)
        policy.set_sample_backward(True)
    with _step("loading the model"):
        model, what = _load_model(args)
    x = torch.randn(shape)
    try:
        with torch.no_grad():
            model.eval()(x)
    except Exception as e:  # noqa: BLE001
        raise CLIError(f"the model does not run on an input of shape {tuple(shape)} ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:200] if str(e) else ''}); set --input-shape") from None
    model.train()
    if args.calibrate or args.target_error is not None:
        policy = _calibrated(args, model)
    if args.tune:
        if shape[0] < 8:
            print(f"[fxbns] note: --tune times the layers at batch {shape[0]}; give the training batch size in "
                  f"--input-shape (the choice depends on the layer sizes)", file=sys.stderr)
        with _step(f"timing the sampled layers in {args.tune_steps} training step pairs (--tune)"):
            tuned = fxbns.tune(model, policy, torch.randn(shape), steps=args.tune_steps)
        print(tuned)
        policy = tuned.policy
    if args.save_policy:
        try:
            policy.save(args.save_policy)
        except ValueError as e:
            raise CLIError(f"--save-policy: {e}", 2) from None
        print(f"policy: {args.save_policy}")
    if args.explain:
        with _step("planning (dry run)"):
            rep = fxbns.explain(model, policy, x)
    else:
        with _step(f"rewriting with policy {args.policy!r}"):
            gm = fxbns.transform(model, policy, example_inputs=x)
        rep = fxbns.report(gm)
    print(f"model: {what}; input {'x'.join(map(str, shape))}")
    print(rep)
    if args.report:
        from ._io import atomic_write_text

        doc = rep.to_dict()
        if args.tune:  # the timings behind the tuned policy
            doc["tune"] = {"steps": tuned.steps, "sites": tuned.rows}
        atomic_write_text(args.report, json.dumps(_jsonable(doc), indent=2) + "\n")
        print(f"report: {args.report}")
    if args.explain:
        return 0
    if args.out:
        with _step("saving the checkpoint"):
            fxbns.save(gm, args.out)
        print(f"checkpoint: {args.out} (rebuild with fxbns.load(path, model))")
    if args.onnx:
        with _step("exporting ONNX and checking it in onnxruntime"):
            gm.eval()
            res = fxbns.export_onnx(gm, x, args.onnx)
        print(f"onnx: {res.path} ({res.exporter} exporter, {res.bn_folded} BatchNorms folded, {res.onnx_nodes} nodes, "
              f"opset {res.opset}); onnxruntime {'/'.join(res.providers)} max relative error {res.max_error:.1e} "
              f"at batch {' and '.join(map(str, res.checked_batches))}")
        if res.fallback_reason:
            print(f"note: the dynamo exporter failed ({res.fallback_reason}); used the TorchScript exporter")
    return 0


def _calibrated(args, model):
    """--calibrate: the policy fxbns.calibrate chooses on the batches in the file (seed, --min-elements and
    --sample-backward applied to it)."""
    import torch

    import fxbns

    if not args.calibrate:
        raise CLIError("--target-error applies to --calibrate FILE; add --calibrate", 2)
    target = fxbns.stats.DEFAULT_TARGET_ERROR if args.target_error is None else args.target_error
    if not 0 < target <= 1:
        raise CLIError(f"--target-error must be in (0, 1], e.g. 0.1; got {target:g}", 2)
    path = args.calibrate
    if not os.path.isfile(path):
        raise CLIError(f"--calibrate {path!r}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
        raise CLIError(f"--calibrate {path!r}: not a readable PyTorch file of tensors ({type(e).__name__})") from None
    batches = [obj] if isinstance(obj, torch.Tensor) else obj
    if not isinstance(batches, (list, tuple)) or not batches or not all(isinstance(b, torch.Tensor) for b in batches):
        raise CLIError(f"--calibrate {path!r} holds a {type(obj).__name__}; save one input tensor or a list of input "
                       f"tensors (torch.save([x1, x2, ...], path))")
    with _step(f"calibrating the policy on {len(batches)} batches of {path} (--calibrate)"):
        try:
            cal = fxbns.calibrate(model, batches, target_error=target, num_batches=len(batches),
                                  min_elements=args.min_elements or 0)
        except ValueError as e:
            raise CLIError(f"--calibrate: {e}") from None
    print(cal)
    policy = cal.policy.set_seed(args.seed)
    if args.sample_backward:
        policy.set_sample_backward(True)
    return policy


def _jsonable(o):
    from .estimators import spec_to_dict

    if isinstance(o, dict):
        return {k: _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if hasattr(o, "kind") and hasattr(o, "describe"):
        return spec_to_dict(o)
    return o


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"fxbns: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            if not args.debug:  # one line, without the source location (--debug keeps Python's own format)
                warnings.showwarning = _show_warning
            return run(args)
    except CLIError as e:
        if args.debug:
            raise
        print(f"fxbns: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("fxbns: interrupted; no output was left half-written", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one clear line unless --debug
        if args.debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"fxbns: error: {type(e).__name__}: {msg} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
