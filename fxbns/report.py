"""Per-site report: one row per BatchNorm site, printable as a table, with ``to_dict()``.

>>> r = Report([{"name": "bn1", "producer": "conv", "shape": None, "estimator": "exact", "sample": None,
...              "fraction": None, "reason": "policy: exact"}], mode="graph", opaque={})
>>> "bn1" in str(r)
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .estimators import BatchSampling, FeatureSampling, VirtualDataset
from .sampling import fs_fallback

__all__ = ["Report", "sample_size"]


def sample_size(spec, shape: tuple[int, ...] | None) -> tuple[int | None, float | None]:
    """(elements per channel used for the statistics, fraction of the real batch's elements)."""
    if spec is None or shape is None or len(shape) < 2:
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


@dataclass
class Report:
    rows: list[dict[str, Any]]
    mode: str  # "graph" (traced) or "swap" (root not traceable: modules swapped in place)
    opaque: dict[str, str] = field(default_factory=dict)
    root_error: str | None = None
    virtual: str | None = None
    micro: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "opaque": dict(self.opaque), "root_error": self.root_error,
                "virtual": self.virtual, "micro": self.micro, "sites": [dict(r) for r in self.rows]}

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def __str__(self) -> str:
        cols = ["name", "producer", "shape", "estimator", "sample", "reason"]
        table = []
        for r in self.rows:
            shape = "x".join(map(str, r["shape"])) if r.get("shape") else "?"
            sample = "-" if r.get("sample") is None else f"{r['sample']} ({100 * r['fraction']:.1f}%)"
            table.append([r["name"], r["producer"], shape, r["estimator"], sample, r.get("reason") or ""])
        widths = [max(len(c), *(len(str(t[i])) for t in table)) if table else len(c) for i, c in enumerate(cols)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip(),
                 "  ".join("-" * w for w in widths)]
        lines += ["  ".join(str(v).ljust(w) for v, w in zip(t, widths)).rstrip() for t in table]
        n_sampled = sum(1 for r in self.rows if r["estimator"] != "exact")
        lines.append(f"{len(self.rows)} BatchNorm sites, {n_sampled} sampled, {len(self.rows) - n_sampled} exact; "
                     f"mode: {self.mode}")
        small = sum(1 for r in self.rows if (r.get("exact_below_batch") or 0) > 1)
        if small:
            lines.append(f"{small} sampled sites keep exact statistics at small batches (min_elements): "
                         f"see 'exact below batch' in their reason")
        if self.virtual:
            lines.append(f"virtual batch: {self.virtual}")
        if self.micro:
            lines.append(f"micro-batch: {self.micro}")
        for k, v in self.opaque.items():
            lines.append(f"opaque subtree {k!r}: {v}")
        if self.root_error:
            lines.append(f"root not traceable ({self.root_error}); BatchNorm modules swapped in place")
        return "\n".join(lines)

    __repr__ = __str__
