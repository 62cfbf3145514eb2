"""Per-layer policy: which estimator each BatchNorm site uses (modelled on ``QConfigMapping``).

Priority, lowest to highest: default < Conv->BN pairs < module type < module-name regex (ordered,
first match wins) < exact module name < callable.  ``None`` or ``Exact()`` leaves a site as BatchNorm.
A module name or a regex that names no BatchNorm site of the model is an error at :func:`fxbns.transform`,
listing the closest site names.

Policy files (JSON or YAML) hold the same rules (:meth:`Policy.to_dict`).  Any estimator in a file can name
a preset instead of spelling out its fields, with fields to change beside it; a top-level ``preset`` is the
policy the other keys start from::

    preset: micro                  # start from the micro preset (its fs default and micro-batch regime)
    default: {preset: fs}          # the fs preset's estimator: band, 1/16, per sample, exact below 2**19
    module_name_regex:
      - ['layer4\\..*', {preset: bs, min_elements: 0}]   # bs preset's estimator, sampling every layer
    module_name:
      bn1: {kind: exact}
    micro_batch: {preset: micro, threshold: 2}

``{kind: fs}`` is the :class:`~fxbns.FeatureSampling` class with its own defaults, not the fs preset.  The
defaults, in one place:

=====================  ==========================================================================
spec                   defaults
=====================  ==========================================================================
``{kind: bs}``         ``ratio=0.125, min_samples=2, draw="block", min_elements=0``
``{kind: fs}``         ``area_ratio=1/16, layout="patch", per_sample=False, min_elements=0``
``{kind: vdn}``        ``num_samples=4, mix=1.0 (virtual rows only), distribution="normal"``
``{kind: micro}``      ``threshold=4, estimator=vdn(num_samples=4, mix=0.5 with all real rows)``
``{preset: bs}``       ``bs(ratio=0.125, min_samples=2, min_elements=2**18)``
``{preset: fs}``       ``fs(area_ratio=1/16, layout="band", per_sample=True, min_elements=2**19)``
``{preset: vdn}``      ``vdn(num_samples=4, mix=0.5, real=fs(band, 1/16, per_sample))``
``{preset: micro}``    as an estimator, the fs preset's; as ``micro_batch``, ``micro(threshold=4)``
``{preset: exact}``    ``exact``
=====================  ==========================================================================

``sample_backward`` is ``False`` everywhere unless set.

>>> import torch
>>> from fxbns import BatchSampling, Exact, Policy
>>> p = Policy.from_preset("fs").set_module_name_regex(r"layer4\\..*", BatchSampling()).set_module_name("bn1", None)
>>> p.spec_for("layer4.0.bn1", torch.nn.BatchNorm2d(4), producer="conv").kind
'bs'
>>> p.spec_for("bn1", torch.nn.BatchNorm2d(4), producer="conv") is None
True
>>> Policy.from_dict({"default": {"preset": "fs", "min_elements": 0}}).default.describe()
'fs(band, area=0.0625, per_sample)'
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from collections.abc import Callable
from typing import Any

from torch import nn

from .distributed import _non_member
from .estimators import (
    BatchSampling,
    Exact,
    FeatureSampling,
    MicroBatch,
    VirtualDataset,
    _check_min_elements,
    spec_from_dict,
    spec_to_dict,
)

__all__ = ["Policy", "PRESETS", "resolve_policy"]

_FS_SAMPLE = FeatureSampling(area_ratio=1 / 16, layout="band", per_sample=True)
# the presets leave the size threshold to the device's speed rule (fxbns.ops.dispatch.SPEED_RULES)
_FS_DEFAULT = dataclasses.replace(_FS_SAMPLE, min_elements=None)

#: Preset name -> (description, factory).  The numbers are the ones documented in the README.
PRESETS: dict[str, tuple[str, Callable[[], Policy]]] = {}


def _preset(name: str, doc: str):
    def deco(fn):
        PRESETS[name] = (doc, fn)
        return fn
    return deco


_TYPE_NAMES = {
    "BatchNorm1d": nn.BatchNorm1d,
    "BatchNorm2d": nn.BatchNorm2d,
    "BatchNorm3d": nn.BatchNorm3d,
    "SyncBatchNorm": nn.SyncBatchNorm,
}


class Policy:
    """Per-layer estimator choice.  Setters return ``self`` so they chain."""

    def __init__(self, default: Any = _FS_DEFAULT, *, micro: MicroBatch | None = None, seed: int = 0,
                 input_name: str | None = None) -> None:
        self.default = default
        self.conv_bn: Any = _UNSET
        self.object_types: list[tuple[type, Any]] = []
        self.name_regexes: list[tuple[str, Any]] = []
        self.names: dict[str, Any] = {}
        self.fn: Callable[[str, nn.Module, Any], Any] | None = None
        self.micro = micro
        self.seed = int(seed)
        self.input_name = input_name
        self.preset: str | None = None
        self.sync = False  # synchronize statistics across processes (set_sync)
        self.sync_group: Any = None  # its process group (None: WORLD)
        self.sync_regex: str | None = None  # only the sites whose name fully matches (None: every site)

    # -- setters ---------------------------------------------------------------------------------
    def set_global(self, spec: Any) -> Policy:
        """Estimator for every site no other rule covers.

        Args:
            spec: an estimator spec (``None`` or :class:`~fxbns.Exact`: exact).

        Returns:
            ``self``.

        >>> from fxbns import BatchSampling
        >>> Policy().set_global(BatchSampling()).default.kind
        'bs'
        """
        self.default = spec
        return self

    def set_conv_bn(self, spec: Any) -> Policy:
        """Estimator for BatchNorms fed by a Conv with no other user (Conv->BN pairs)."""
        self.conv_bn = spec
        return self

    def set_object_type(self, cls: type, spec: Any) -> Policy:
        """Estimator for BatchNorm modules of type ``cls`` (e.g. ``nn.BatchNorm1d``)."""
        if not isinstance(cls, type):
            raise TypeError(f"set_object_type takes a class such as nn.BatchNorm2d; got {cls!r}")
        self.object_types = [(c, s) for c, s in self.object_types if c is not cls] + [(cls, spec)]
        return self

    def set_module_name_regex(self, pattern: str, spec: Any) -> Policy:
        """Estimator for sites whose qualified name fully matches ``pattern`` (first match wins).

        Args:
            pattern: a regular expression (``re.fullmatch``); an error at transform if it matches no site.
            spec: an estimator spec (``None``: exact).

        Returns:
            ``self``.

        >>> Policy().set_module_name_regex(r"layer4\\..*", None).spec_for("layer4.0.bn1", None) is None
        True
        """
        re.compile(pattern)
        self.name_regexes.append((pattern, spec))
        return self

    def set_module_name(self, name: str, spec: Any) -> Policy:
        """Estimator for the site with qualified name ``name`` (e.g. ``"layer1.0.bn1"``).

        Args:
            name: the BatchNorm's qualified name (an error at transform if the model has no such site).
            spec: an estimator spec (``None``: exact).

        Returns:
            ``self``.

        >>> Policy.from_preset("fs").set_module_name("bn1", None).spec_for("bn1", None) is None
        True
        """
        self.names[name] = spec
        return self

    def set_callable(self, fn: Callable[[str, nn.Module, Any], Any] | None) -> Policy:
        """``fn(qualname, module, site) -> spec``; returning ``...`` (Ellipsis) defers to the other rules."""
        self.fn = fn
        return self

    def set_micro_batch(self, micro: MicroBatch | None) -> Policy:
        """Micro-batch regime: at runtime batch <= ``micro.threshold`` every site uses ``micro.estimator``."""
        if micro is not None and not isinstance(micro, MicroBatch):
            raise TypeError(f"set_micro_batch takes a MicroBatch or None; got {micro!r}")
        self.micro = micro
        return self

    def set_min_elements(self, n: int) -> Policy:
        """Set ``min_elements`` on every BS and FS spec of the policy (default, conv pairs, types, names).

        Layers smaller than ``n`` (``fxbns.estimators.layer_size``) then keep exact statistics on every device;
        ``0`` samples every layer the statistical rule allows; ``None`` (the presets) uses the threshold of the
        device the layer runs on (``fxbns.ops.dispatch.SPEED_RULES``).  Specs set later are not changed.
        """
        _check_min_elements("Policy", n)
        return self._replace_sampling(min_elements=n)

    def set_sample_backward(self, on: bool = True) -> Policy:
        """Set ``sample_backward`` on every BS and FS spec of the policy (default, conv pairs, types, names):
        the backward's two gradient sums are then estimated from the sample and fed to BatchNorm's own backward
        formula on every element (the backward reads dy and x once instead of twice; see
        :mod:`fxbns.ops.reference`).  Specs set later are not changed.  Gradient norms and their agreement with
        exact BatchNorm's: ``examples/gradient_stability.py``."""
        if not isinstance(on, bool):
            raise TypeError(f"set_sample_backward: on must be True or False, got {on!r}")
        return self._replace_sampling(sample_backward=on)

    def _replace_sampling(self, **fields) -> Policy:
        def fix(spec):
            return dataclasses.replace(spec, **fields) if isinstance(spec, (BatchSampling, FeatureSampling)) else spec

        self.default = fix(self.default)
        if self.conv_bn is not _UNSET:
            self.conv_bn = fix(self.conv_bn)
        self.object_types = [(c, fix(s)) for c, s in self.object_types]
        self.name_regexes = [(p, fix(s)) for p, s in self.name_regexes]
        self.names = {k: fix(v) for k, v in self.names.items()}
        return self

    def set_sync(self, process_group: Any = None, *, module_name_regex: str | None = None,
                 enabled: bool = True) -> Policy:
        """Synchronize training statistics across processes (``torch.distributed``), exact or sampled.

        Every synchronized site combines the count, mean and squared deviations of each rank's sample (its
        estimator's sample, or the whole local batch for exact sites) in one collective per layer and step, and
        its backward's two gradient sums in one more (``fxbns.distributed``).  While ``torch.distributed`` is not
        initialised it does nothing, as ``nn.SyncBatchNorm``.  ``nn.SyncBatchNorm`` modules of the model are
        synchronized sites whatever this says, over their own process group.  A synchronized site does not take
        part in the micro-batch regime (its statistics come from the whole group), and VirtualDataset sites
        cannot be synchronized (``transform`` says so).

        Args:
            process_group: the ``torch.distributed`` group to synchronize over; ``None`` is the whole world.
                A process group cannot be saved: ``to_dict`` writes ``None`` (WORLD), so after loading a policy
                that synchronized over another group, call ``set_sync(group)`` again.  A group that does not
                contain a rank raises on that rank at its first training step.
            module_name_regex: synchronize only the sites whose qualified name fully matches it (the others
                keep per-rank statistics); ``None``: every site.
            enabled: ``False`` turns synchronization off again.

        Returns:
            The policy (setters chain).

        >>> from fxbns import Policy
        >>> Policy.from_preset("exact").set_sync().to_dict()["sync"]
        {'process_group': None}
        """
        if not isinstance(enabled, bool):
            raise TypeError(f"set_sync: enabled must be True or False, got {enabled!r}")
        if process_group is not None:
            import torch.distributed as dist
            # (torch.distributed.new_group returns GroupMember.NON_GROUP_MEMBER on the ranks it leaves out: accepted
            # here, and such a rank raises at its first training step, where the group is used)
            if not (dist.is_available() and (isinstance(process_group, dist.ProcessGroup)
                                             or _non_member(process_group))):
                raise TypeError(f"set_sync takes a torch.distributed ProcessGroup (e.g. from "
                                f"torch.distributed.new_group) or None for the whole world; got {process_group!r}")
        if module_name_regex is not None:
            re.compile(module_name_regex)
        self.sync, self.sync_group, self.sync_regex = enabled, process_group if enabled else None, (
            module_name_regex if enabled else None)
        return self

    def sync_for(self, qualname: str) -> bool:
        """Whether the policy synchronizes the site named ``qualname`` (see :meth:`set_sync`)."""
        return self.sync and (self.sync_regex is None or re.fullmatch(self.sync_regex, qualname) is not None)

    def set_seed(self, seed: int) -> Policy:
        self.seed = int(seed)
        return self

    def set_input(self, name: str | None) -> Policy:
        """Name of the graph input the virtual batch is concatenated to (default: the first input)."""
        self.input_name = name
        return self

    # -- resolution ------------------------------------------------------------------------------
    def spec_for(self, qualname: str, module: nn.Module | None, producer: str = "other", site: Any = None) -> Any:
        """The estimator for one site; ``None`` means leave it exact.

        Args:
            qualname: the site's qualified name.
            module: the BatchNorm module (or ``None``).
            producer: ``"conv"`` for a Conv->BN pair, else ``"linear"``, ``"other"``, ``"input"``, ``"opaque"``.
            site: the planned site, passed to a callable rule.

        Returns:
            The spec, or ``None``.

        >>> Policy.from_preset("exact").spec_for("bn1", None) is None
        True
        """
        spec = self.default
        if producer == "conv" and self.conv_bn is not _UNSET:
            spec = self.conv_bn
        if module is not None:
            for cls, s in self.object_types:
                if type(module) is cls:
                    spec = s
                    break
            else:
                for cls, s in self.object_types:
                    if isinstance(module, cls):
                        spec = s
                        break
        for pattern, s in self.name_regexes:
            if re.fullmatch(pattern, qualname):
                spec = s
                break
        if qualname in self.names:
            spec = self.names[qualname]
        if self.fn is not None:
            out = self.fn(qualname, module, site)
            if out is not ...:
                spec = out
        return None if isinstance(spec, Exact) else spec

    def validate_names(self, site_names: list[str], module_names: list[str]) -> None:
        """Raise ``ValueError`` for a ``set_module_name`` naming no BatchNorm site of the model, or a
        ``set_module_name_regex`` matching none (with the closest site names)."""
        known = set(site_names)
        for name in self.names:
            if name not in known:
                close = difflib.get_close_matches(name, site_names, n=5, cutoff=0.4)
                where = "is not a BatchNorm in this model" if name in set(module_names) else "is not in the model"
                hint = f"; closest BatchNorm names: {', '.join(close)}" if close else \
                    f"; its BatchNorms are e.g. {', '.join(site_names[:5])}"
                raise ValueError(f"policy names module {name!r}, which {where}{hint}")
        for pattern, _ in self.name_regexes:
            if not any(re.fullmatch(pattern, n) for n in site_names):
                probe = re.sub(r"\\(.)|[\^$*+?()\[\]{}|]", r"\1", pattern).replace("..", ".")
                close = difflib.get_close_matches(probe, site_names, n=5, cutoff=0.3)
                hint = f"closest BatchNorm names: {', '.join(close)}" if close else \
                    f"its BatchNorms are e.g. {', '.join(site_names[:5]) or '(none)'}"
                raise ValueError(f"policy module_name_regex '{pattern}' matches no BatchNorm site of this model "
                                 f"(a regex must match the whole qualified name); {hint}")

    def specs(self) -> list[Any]:
        """Every estimator the policy sets: default, conv pairs, types, name regexes, names (not a callable's)."""
        return ([self.default] + ([self.conv_bn] if self.conv_bn is not _UNSET else [])
                + [s for _, s in self.object_types] + [s for _, s in self.name_regexes] + list(self.names.values()))

    def uses_virtual(self) -> bool:
        return self.micro is not None or any(isinstance(s, VirtualDataset) for s in self.specs())

    # -- persistence -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON/YAML-able dict (a callable, if set, cannot be saved and is reported as such).

        Returns:
            The dict :meth:`from_dict` reads back.

        >>> Policy.from_preset("bs").to_dict()["default"]["ratio"]
        0.125
        """
        if self.fn is not None:
            raise ValueError("a Policy with a callable (set_callable) cannot be saved as a dict; "
                             "express it with set_module_name / set_module_name_regex instead")
        d: dict[str, Any] = {"default": spec_to_dict(self.default)}
        if self.conv_bn is not _UNSET:
            d["conv_bn"] = spec_to_dict(self.conv_bn)
        if self.object_types:
            d["object_type"] = [[c.__name__, spec_to_dict(s)] for c, s in self.object_types]
        if self.name_regexes:
            d["module_name_regex"] = [[p, spec_to_dict(s)] for p, s in self.name_regexes]
        if self.names:
            d["module_name"] = {k: spec_to_dict(v) for k, v in self.names.items()}
        if self.micro is not None or self.preset is not None:  # (null: no regime, even if the preset has one)
            d["micro_batch"] = spec_to_dict(self.micro)
        d["seed"] = self.seed
        if self.input_name is not None:
            d["input"] = self.input_name
        if self.preset is not None:
            d["preset"] = self.preset
        if self.sync:  # the process group itself is not serialisable: None (WORLD) on reload, see set_sync
            d["sync"] = {"process_group": None}
            if self.sync_regex is not None:
                d["sync"]["module_name_regex"] = self.sync_regex
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Policy:
        """The policy a :meth:`to_dict` dict (or a policy file's content) describes.

        Args:
            d: the mapping; see the module docstring for the keys and the ``preset`` shorthand.

        Returns:
            The :class:`Policy`.

        >>> Policy.from_dict({"preset": "micro", "micro_batch": {"preset": "micro", "threshold": 2}}).micro.threshold
        2
        """
        if not isinstance(d, dict):
            raise ValueError(f"a policy must be a mapping; got {type(d).__name__}")
        known = {"default", "conv_bn", "object_type", "module_name_regex", "module_name", "micro_batch", "seed",
                 "input", "preset", "sync"}
        extra = set(d) - known
        if extra:
            raise ValueError(f"unknown policy keys {sorted(extra)}; allowed: {sorted(known)}")
        preset = d.get("preset")
        if preset is not None:
            p = cls.from_preset(preset)
            p.seed, p.input_name = int(d.get("seed", p.seed)), d.get("input", p.input_name)
            if "default" in d:
                p.set_global(_spec(d["default"], "default"))
        else:
            p = cls(_spec(d["default"], "default") if "default" in d else _FS_DEFAULT, seed=int(d.get("seed", 0)),
                    input_name=d.get("input"))
        if "conv_bn" in d:
            p.set_conv_bn(_spec(d["conv_bn"], "conv_bn"))
        for name, s in d.get("object_type", []):
            if name not in _TYPE_NAMES:
                raise ValueError(f"unknown object_type {name!r}; use one of {sorted(_TYPE_NAMES)}")
            p.set_object_type(_TYPE_NAMES[name], _spec(s, f"object_type {name}"))
        for pattern, s in d.get("module_name_regex", []):
            p.set_module_name_regex(pattern, _spec(s, f"module_name_regex {pattern!r}"))
        for name, s in d.get("module_name", {}).items():
            p.set_module_name(name, _spec(s, f"module_name {name!r}"))
        if "micro_batch" in d:
            p.set_micro_batch(_spec(d["micro_batch"], "micro_batch", micro=True))
        p.preset = d.get("preset")
        sync = d.get("sync")
        if sync is not None:
            if not isinstance(sync, dict) or set(sync) - {"process_group", "module_name_regex"} or \
                    sync.get("process_group") is not None:
                raise ValueError(f"policy key 'sync' must be a mapping {{'process_group': null (the whole world), "
                                 f"'module_name_regex': optional pattern}}; got {sync!r}")
            p.set_sync(None, module_name_regex=sync.get("module_name_regex"))
        return p

    def save(self, path: str | os.PathLike) -> None:
        """Write the policy as JSON (``.json``) or YAML (``.yaml``/``.yml``), atomically.

        Args:
            path: the file.

        Returns:
            None.

        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "p.yaml")
        >>> Policy.from_preset("bs").save(path)
        >>> Policy.load(path).to_dict() == Policy.from_preset("bs").to_dict()
        True
        """
        from ._io import atomic_write_text
        path = os.fspath(path)
        if path.endswith((".yaml", ".yml")):
            import yaml
            text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        else:
            text = json.dumps(self.to_dict(), indent=2) + "\n"
        atomic_write_text(path, text)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Policy:
        """Read a JSON or YAML policy file (see the module docstring for the format).

        Args:
            path: the file.

        Returns:
            The :class:`Policy` (see :meth:`save` for an example).
        """
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ValueError(f"cannot read policy file {path!r}: {e.strerror}") from None
        try:
            if path.endswith((".yaml", ".yml")):
                import yaml
                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as e:  # noqa: BLE001 - any parse error is reported the same way
            raise ValueError(f"policy file {path!r} is not valid {'YAML' if path.endswith(('yaml', 'yml')) else 'JSON'}: "
                             f"{e}") from None
        return cls.from_dict(data)

    @classmethod
    def from_preset(cls, name: str) -> Policy:
        """One of the presets: ``exact``, ``bs``, ``fs``, ``vdn``, ``micro`` (see :data:`PRESETS`).

        Args:
            name: the preset's name.

        Returns:
            A new :class:`Policy`.

        >>> Policy.from_preset("micro").micro.threshold
        4
        """
        if name not in PRESETS:
            close = difflib.get_close_matches(name, list(PRESETS), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(f"unknown preset {name!r}{hint}; presets: {', '.join(PRESETS)}")
        p = PRESETS[name][1]()
        p.preset = name
        return p

    def __repr__(self) -> str:
        try:
            return f"Policy({self.to_dict()})"
        except ValueError:
            return f"Policy(default={self.default!r}, callable={self.fn!r})"


def _spec(d: Any, where: str, micro: bool = False) -> Any:
    """An estimator from a policy file entry: ``{kind: ..., fields}`` or ``{preset: name, fields to change}``."""
    if not (isinstance(d, dict) and "preset" in d):
        try:
            return spec_from_dict(d)
        except ValueError as e:
            raise ValueError(f"policy {where}: {e}") from None
    if "kind" in d:
        raise ValueError(f"policy {where}: give 'kind' (a spec class with its own defaults) or 'preset' (a "
                         f"preset's estimator), not both; got {d!r}")
    name = d["preset"]
    if name not in PRESETS:
        close = difflib.get_close_matches(str(name), list(PRESETS), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"policy {where}: unknown preset {name!r}{hint}; presets: {', '.join(PRESETS)}")
    base = Policy.from_preset(name)
    spec = base.micro if micro else base.default
    if micro and spec is None:
        raise ValueError(f"policy {where}: preset {name!r} has no micro-batch regime; use {{preset: micro}} or "
                         f"{{kind: micro, threshold: 4}}")
    fields = {k: v for k, v in d.items() if k != "preset"}
    if not fields:
        return spec
    if isinstance(spec, Exact):
        raise ValueError(f"policy {where}: preset {name!r} has no fields to change; got {sorted(fields)}")
    known = {f.name for f in dataclasses.fields(spec)}
    bad = sorted(set(fields) - known)
    if bad:
        raise ValueError(f"policy {where}: {type(spec).__name__} (preset {name!r}) has no field "
                         f"{', '.join(map(repr, bad))}; fields: {', '.join(sorted(known))}")
    merged = {**spec_to_dict(spec), **fields}
    try:
        return spec_from_dict(merged)
    except ValueError as e:
        raise ValueError(f"policy {where}: {e}") from None


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


_UNSET: Any = _Unset()


@_preset("exact", "plain BatchNorm everywhere (the identity rewrite)")
def _exact() -> Policy:
    return Policy(Exact())


@_preset("bs", "Batch Sampling: statistics from 1/8 of the batch (at least 2 samples), a contiguous block; "
                "layers under the device's size threshold exact (CPU: 2**18 elements)")
def _bs() -> Policy:
    return Policy(BatchSampling(ratio=0.125, min_samples=2, min_elements=None))


@_preset("fs", "Feature Sampling: 1/16 of every feature map as a band, spread over the batch from top to bottom; "
                "layers under the device's size threshold exact (CPU: 2**19 elements)")
def _fs() -> Policy:
    return Policy(_FS_DEFAULT)


@_preset("vdn", "Virtual Dataset Normalization: 4 virtual samples pooled 1:1 with a 1/16 FS sample of the real rows")
def _vdn() -> Policy:
    return Policy(VirtualDataset(num_samples=4, mix=0.5, real=_FS_SAMPLE))


@_preset("micro", "fs, and at batch <= 4 every site pools all real rows 1:1 with 4 virtual samples")
def _micro() -> Policy:
    return Policy(_FS_DEFAULT, micro=MicroBatch(threshold=4))


def resolve_policy(policy: Any) -> Policy:
    """Accept a Policy, a preset name, a JSON/YAML file path, a dict, a spec or ``None`` (exact)."""
    if isinstance(policy, Policy):
        return policy
    if policy is None:
        return Policy(Exact())
    if isinstance(policy, (Exact, BatchSampling, FeatureSampling, VirtualDataset)):
        return Policy(policy)
    if isinstance(policy, dict):
        return Policy.from_dict(policy)
    if isinstance(policy, (str, os.PathLike)):
        s = os.fspath(policy)
        if s in PRESETS:
            return Policy.from_preset(s)
        if s.endswith((".json", ".yaml", ".yml")) or os.sep in s or os.path.exists(s):
            if not os.path.exists(s):
                raise ValueError(f"policy file {s!r} does not exist")
            return Policy.load(s)
        return Policy.from_preset(s)  # raises the unknown-preset error with suggestions
    raise TypeError(f"policy must be a Policy, a preset name ({', '.join(PRESETS)}), a file path, a dict or a "
                    f"spec; got {type(policy).__name__}")
