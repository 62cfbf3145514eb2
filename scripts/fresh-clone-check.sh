#!/usr/bin/env bash
# The README's two set-up commands on a fresh clone of this repository's HEAD, as a new user runs them:
# `bash scripts/demo.sh` (which creates .venv), then `bash .ci/run` (the test suite, what CI runs) in the same clone.
# `../shared` is linked beside the clone when this checkout has one, as CI has it. Writes the timings, the exit
# codes and pytest's summary line to examples/results/fresh_clone.json (or the path given as $1), keeps the logs
# in the printed folder and removes the clone (its .venv takes a few GB). Takes about as long as the suite plus
# the demo (15-20 min on 2 cores).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root/examples/results/fresh_clone.json}"
work="$(mktemp -d)"
git clone -q "$root" "$work/fxbns" || { echo "fresh-clone-check: git clone failed" >&2; exit 2; }
if [ -d "$root/../shared" ]; then ln -s "$root/../shared" "$work/shared"; fi
cd "$work/fxbns"
commit="$(git rev-parse HEAD)"
echo "fresh-clone-check: $commit in $work/fxbns"
t0=$(date +%s)
bash scripts/demo.sh > "$work/demo.log" 2>&1
demo_rc=$?
t1=$(date +%s)
bash .ci/run > "$work/ci.log" 2>&1
ci_rc=$?
t2=$(date +%s)
summary="$(grep -E '[0-9]+ (passed|failed|error)' "$work/ci.log" | tail -1)"
demo_end="$(tail -1 "$work/demo.log")"
python3 - "$out" "$commit" "$demo_rc" "$((t1 - t0))" "$demo_end" "$ci_rc" "$((t2 - t1))" "$summary" <<'EOF'
import json, os, platform, sys, time
out, commit, demo_rc, demo_s, demo_end, ci_rc, ci_s, summary = sys.argv[1:]
rec = {"command": "bash scripts/fresh-clone-check.sh", "commit": commit,
       "steps": [{"command": "bash scripts/demo.sh", "returncode": int(demo_rc), "seconds": int(demo_s),
                  "last_line": demo_end, "note": "creates .venv: pip install -e '.[test,dev]'"},
                 {"command": "bash .ci/run", "returncode": int(ci_rc), "seconds": int(ci_s),
                  "pytest_summary": summary.strip("= ")}],
       "date": time.strftime("%Y-%m-%d %H:%M:%S"), "python": platform.python_version(), "cores": os.cpu_count()}
with open(out, "w") as f:
    f.write(json.dumps(rec, indent=2) + "\n")
print(json.dumps(rec, indent=2))
EOF
cd "$work" && rm -rf "$work/fxbns"
echo "logs: $work/demo.log $work/ci.log"
[ "$demo_rc" -eq 0 ] && [ "$ci_rc" -eq 0 ]
