"""Mutation-testing figures from mutmut's results (``mutants/``), per module, and random samples of mutants.

mutmut (``[tool.mutmut]`` in pyproject.toml) keeps each mutant's exit code in ``mutants/<module>.meta``.  This
tool counts them per module, over every mutant or over a sample, and draws the samples: where a module has more
mutants than a session can run (each surviving mutant runs every test that covers its function), a uniform random
sample of its mutants estimates its kill rate without the bias of mutmut's own order (cheapest first).

    python tools/mutation.py sample fxbns/stats.py 120 --seed 1 > names.txt   # mutant names, one per line
    .venv/bin/python -m mutmut run --max-children 2 $(cat names.txt)
    python tools/mutation.py summary --sample names.txt --record out/mutation.json

``summary`` prints one row per module: mutants counted, killed (a test failed), timed out (counted as killed:
the tests did not pass), survived, without a covering test, and the kill rate with a 95% Wilson interval when a
sample was counted.  ``--record`` writes the figures and every survivor's name as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections import Counter
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
          24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout", None: "not checked"}


def _modules() -> list[str]:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return list(cfg["tool"]["mutmut"]["only_mutate"])


def _results(module: str) -> dict[str, int | None]:
    meta = ROOT / "mutants" / (module + ".meta")
    if not meta.exists():
        raise SystemExit(f"no mutmut results for {module}: {meta} is missing (run mutmut first)")
    return json.loads(meta.read_text(encoding="utf-8"))["exit_code_by_key"]


def _module_of(name: str) -> str:
    """``fxbns.ops.cpu.x_f__mutmut_3`` -> ``fxbns/ops/cpu.py``."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        path = "/".join(parts[:i]) + ".py"
        if (ROOT / path).exists():
            return path
    raise SystemExit(f"mutant {name!r} names no module of this project")


def _wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def cmd_sample(args) -> None:
    names = sorted(_results(args.module))
    if args.count > len(names):
        raise SystemExit(f"{args.module} has {len(names)} mutants; asked for {args.count}")
    print("\n".join(sorted(random.Random(args.seed).sample(names, args.count))))


def cmd_summary(args) -> None:
    sample: dict[str, set[str]] = {}
    for f in args.sample or []:
        for name in Path(f).read_text(encoding="utf-8").split():
            sample.setdefault(_module_of(name), set()).add(name)
    rows, record = [], {"modules": {}}
    for module in _modules():
        res = _results(module)
        keys = sorted(sample[module]) if module in sample else sorted(res)
        c = Counter(STATUS.get(res.get(k), "suspicious") for k in keys)
        tested = c["killed"] + c["timeout"] + c["survived"]
        killed = c["killed"] + c["timeout"]
        lo, hi = _wilson(killed, tested)
        rate = killed / tested if tested else float("nan")
        scope = f"sample of {len(keys)} of {len(res)}" if module in sample else f"all {len(res)}"
        rows.append([module, scope, str(c["killed"]), str(c["timeout"]), str(c["survived"]), str(c["no tests"]),
                     str(c["not checked"]), f"{100 * rate:.1f}%" + (f" ({100 * lo:.0f}-{100 * hi:.0f}%)"
                                                                 if module in sample else "")])
        record["modules"][module] = {
            "mutants": len(res), "counted": len(keys), "sampled": module in sample, **dict(c),
            "kill_rate": rate, "kill_rate_95": [lo, hi] if module in sample else None,
            "survivors": [k for k in keys if STATUS.get(res.get(k)) == "survived"],
            "no_tests": [k for k in keys if STATUS.get(res.get(k)) == "no tests"]}
    cols = ["module", "mutants counted", "killed", "timeout", "survived", "no tests", "not run", "killed %"]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    for r in [cols, ["-" * w for w in widths], *rows]:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    if args.record:
        record.update(_provenance(args.argv))
        Path(args.record).parent.mkdir(parents=True, exist_ok=True)
        Path(args.record).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.record}", file=sys.stderr)


def _provenance(argv: list[str]) -> dict:
    """The command, date, machine and versions a record was made with."""
    import os
    import platform
    import time
    from importlib import metadata

    def version(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    return {"command": " ".join(["python", "tools/mutation.py", *argv]), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "mutmut": version("mutmut"), "torch": version("torch"), "python": platform.python_version(),
            "cores": os.cpu_count()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample", help="a uniform random sample of a module's mutant names")
    s.add_argument("module", help="a path from only_mutate, e.g. fxbns/stats.py")
    s.add_argument("count", type=int)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_sample)
    m = sub.add_parser("summary", help="killed / survived per module")
    m.add_argument("--sample", action="append", help="a file of mutant names: count only these for their module")
    m.add_argument("--record", help="write the figures and survivors as JSON here")
    m.set_defaults(fn=cmd_summary)
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.fn(args)


if __name__ == "__main__":
    main()
