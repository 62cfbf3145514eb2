"""Per-site report: what each BatchNorm site computes in training at a given shape, and why.

Each row says whether the site *runs* sampled or exact statistics at its input shape (``runs``:
``"sampled"``, ``"exact"``, or ``None`` when no shape is known), a short reason (``why``), the estimator the
policy gave it, and how it is reached (``via``: ``"swap"``, the module replaced at its name and called by the
model's own code; ``"graph"``, called from the traced forward; ``None``, left as it is).  ``str(report)``
is a table that fits 100 columns: an estimator shared by several rows is printed once, in a legend; the
full detail of every row is in :meth:`Report.to_dict`.

>>> r = Report([{"name": "bn1", "shape": [8, 4, 2, 2], "estimator": "exact", "runs": "exact",
...              "why": "policy: exact"}], mode="swap")
>>> print(r)
name  shape    runs   why
----  -------  -----  -------------
bn1   8x4x2x2  exact  policy: exact
1 BatchNorm site: 0 sampled, 1 exact in training at these shapes; mode: swap
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .estimators import BatchSampling, Exact, FeatureSampling, MicroBatch, VirtualDataset, layer_size
from .ops.dispatch import speed_rule
from .sampling import fs_fallback

__all__ = ["Report", "sample_size", "runs_at"]

WIDTH = 100  # the table's target width in columns


def sample_size(spec, shape: tuple[int, ...] | None) -> tuple[int | None, float | None]:
    """Elements per channel a spec's statistics use at ``shape``, and their fraction of the batch's elements.

    Args:
        spec: an estimator spec (``None`` or :class:`~fxbns.Exact`: every element).
        shape: the site's input shape ``(N, C, ...)`` (real rows), or ``None``.

    Returns:
        ``(elements, fraction)``, or ``(None, None)`` without a shape.

    >>> from fxbns import BatchSampling
    >>> sample_size(BatchSampling(ratio=0.25), (16, 8, 4, 4))
    (64, 0.25)
    """
    if shape is None or len(shape) < 2:
        return None, None
    N = shape[0]
    spatial = tuple(shape[2:])
    per_row = math.prod(spatial) if spatial else 1
    total = N * per_row
    if isinstance(spec, FeatureSampling) and not spatial:
        spec = fs_fallback(spec)
    if isinstance(spec, BatchSampling):
        n = spec.sample_count(N) * per_row
        return n, n / total
    if isinstance(spec, FeatureSampling):
        n = N * math.prod(spec.points(spatial))
        return n, n / total
    if isinstance(spec, VirtualDataset):
        n = spec.num_samples * per_row
        if spec.mix < 1:
            rn, _ = sample_size(spec.real, shape) if spec.real is not None else (total, 1.0)
            n += rn or 0
        return n, n / total
    return total, 1.0


def runs_at(spec, micro: MicroBatch | None, shape: tuple[int, ...] | None, *, eager_rules: bool = True,
            is_cpu: bool = True) -> tuple[str | None, Any, str]:
    """What a site with ``spec`` (and the policy's micro-batch regime) computes in training at ``shape``.

    Args:
        spec: the site's estimator (``None`` or :class:`~fxbns.Exact`: exact statistics).
        micro: the micro-batch regime of the site, or ``None``.
        shape: the site's input shape (real rows), or ``None`` when unknown.
        eager_rules: apply the eager CPU rule (maps of 2-4 elements run exact; a module site without a virtual
            batch in eager mode).
        is_cpu: whether the site's tensors are on the CPU (the eager rule is measured there only).

    Returns:
        ``(runs, active_spec, why)``: ``runs`` is ``"sampled"``, ``"exact"`` or ``None`` (no shape).

    >>> from fxbns import FeatureSampling
    >>> runs_at(FeatureSampling(min_elements=2 ** 19), None, (8, 64, 16, 16))[::2]
    ('exact', 'under min_elements (131072 < 524288)')
    """
    if shape is None:
        return None, spec, "no shape: pass example_inputs"
    n = shape[0]
    if micro is not None and n <= micro.threshold:
        est = micro.estimator
        return "sampled", est, f"micro-batch (batch {n} <= {micro.threshold}): +{est.num_samples} virtual rows"
    if spec is None or isinstance(spec, Exact):
        return "exact", None, "policy: exact"
    if isinstance(spec, VirtualDataset):
        return "sampled", spec, f"+{spec.num_samples} virtual rows" + ("" if spec.mix == 1 else f", mix {spec.mix:g}")
    device = "cpu" if is_cpu else "cuda"
    from .modules import exact_in_eager, exact_reason

    why = exact_reason(spec, tuple(shape), device)
    if why is not None:
        if why.startswith("below"):
            t = spec.min_elements if spec.min_elements is not None else speed_rule(device).min_elements(spec.kind)
            why = f"under min_elements ({layer_size(shape, device)} < {t})"
        return "exact", spec, why
    if eager_rules and spec.min_elements != 0 and exact_in_eager(spec, tuple(shape), device):
        return "exact", spec, "2-4 element maps: exact is faster (eager CPU)"
    s, frac = sample_size(spec, shape)
    return "sampled", spec, f"{s} of {round(s / frac)} values ({100 * frac:.1f}%)"


def _clip(s: str, w: int) -> str:
    return s if len(s) <= w else s[: max(1, w - 1)] + "~"


@dataclass
class Report:
    """One row per BatchNorm site (dicts, see the module docstring), and what the whole model does.

    Attributes:
        rows: per-site dicts; keys include ``name``, ``shape``, ``estimator``, ``runs``, ``why``, ``via``,
            ``reason`` (every note), ``exact_below_batch``, ``sample``, ``fraction`` and ``sync`` (the process
            group a synchronized site combines its statistics over, e.g. ``"world"``; ``None`` for per-rank).
        mode: ``"swap"`` (the model's own forward runs; BatchNorm modules swapped in place) or ``"graph"``
            (the model's class keeps its methods, its forward runs the traced graph: functional sites or a
            virtual batch need it).
        opaque: submodules traced as leaves, and why.
        root_error: why the root's forward could not be traced (then ``mode`` is ``"swap"``).
        virtual: the virtual batch (VDN, micro-batch), if any.
        micro: the policy's micro-batch regime, if any.
    """

    rows: list[dict[str, Any]]
    mode: str
    opaque: dict[str, str] = field(default_factory=dict)
    root_error: str | None = None
    virtual: str | None = None
    micro: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Everything in the report as plain data (JSON-able but for ``spec`` objects).

        Returns:
            ``{"mode", "opaque", "root_error", "virtual", "micro", "summary", "sites"}``.

        >>> Report([], mode="swap").to_dict()["summary"]
        {'sites': 0, 'sampled': 0, 'exact': 0, 'unknown': 0}
        """
        return {"mode": self.mode, "opaque": dict(self.opaque), "root_error": self.root_error,
                "virtual": self.virtual, "micro": self.micro, "summary": self.counts(),
                "sites": [dict(r) for r in self.rows]}

    def counts(self) -> dict[str, int]:
        """Sites by what they run at the report's shapes.

        Returns:
            ``{"sites", "sampled", "exact", "unknown"}`` (unknown: no shape known).
        """
        runs = [r.get("runs") for r in self.rows]
        return {"sites": len(runs), "sampled": runs.count("sampled"), "exact": runs.count("exact"),
                "unknown": runs.count(None)}

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def __str__(self) -> str:
        ests = [r.get("estimator", "exact") for r in self.rows]
        distinct = list(dict.fromkeys(e for e in ests if e != "exact"))
        legend = {e: chr(ord("A") + i) if i < 26 else str(i) for i, e in enumerate(distinct)}
        vias = {r.get("via") for r in self.rows}
        synced = [r for r in self.rows if r.get("sync")]
        cols = ["name"] + (["via"] if len(vias) > 1 else []) + ["shape"] + (["est"] if len(distinct) > 1 else []) \
            + ["runs"] + (["sync"] if synced else []) + ["why"]
        table = []
        for r in self.rows:
            cell = {"name": r["name"], "via": r.get("via") or "-",
                    "shape": "x".join(map(str, r["shape"])) if r.get("shape") else "?",
                    "est": legend.get(r.get("estimator", "exact"), "-"), "runs": r.get("runs") or "?",
                    "why": r.get("why") or "", "sync": r.get("sync") or "-"}
            table.append([cell[c] for c in cols])
        widths = [max([len(c)] + [len(t[i]) for t in table]) for i, c in enumerate(cols)]
        used = sum(widths[:-1]) + 2 * (len(cols) - 1)
        widths[-1] = max(12, min(widths[-1], WIDTH - used))
        lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip(),
                 "  ".join("-" * w for w in widths)]
        lines += ["  ".join(_clip(v, w).ljust(w) for v, w in zip(t, widths)).rstrip() for t in table]
        c = self.counts()
        unknown = f", {c['unknown']} without a shape" if c["unknown"] else ""
        lines.append(f"{c['sites']} BatchNorm site{'s' if c['sites'] != 1 else ''}: {c['sampled']} sampled, "
                     f"{c['exact']} exact{unknown} in training at these shapes; mode: {self.mode}"
                     + (f" (all via {next(iter(vias))})" if len(vias) == 1 and None not in vias
                        and self.mode == "graph" else ""))
        if len(distinct) == 1:
            lines.append(f"estimator: {distinct[0]}" + (" (sites not marked exact by the policy)"
                                                       if "exact" in ests else ""))
        elif distinct:
            lines += [f"est {legend[e]}: {e}" for e in distinct]
        small = sorted({r["exact_below_batch"] for r in self.rows if (r.get("exact_below_batch") or 0) > 1})
        if small:
            n_small = sum(1 for r in self.rows if (r.get("exact_below_batch") or 0) > 1)
            span = f"{small[0]}" + (f"-{small[-1]}" if len(small) > 1 else "")
            lines.append(f"{n_small} sites keep exact statistics at small batches (min_elements); "
                         f"they sample from batch {span} on")
        if synced:
            lines.append(f"{len(synced)} of {len(self.rows)} sites synchronize their statistics across processes "
                         f"(column sync; per-rank statistics while torch.distributed is not initialised)")
        if self.virtual:
            lines.append(f"virtual batch: {self.virtual}")
        if self.micro:
            lines.append(f"micro-batch: {self.micro}")
        for k, v in self.opaque.items():
            lines.append(_clip(f"opaque subtree {k!r}: {v}", WIDTH))
        if self.root_error:
            lines.append(_clip(f"root not traceable ({self.root_error}); BatchNorm modules swapped in place", WIDTH))
        return "\n".join(lines)

    __repr__ = __str__
