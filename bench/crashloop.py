#!/usr/bin/env python3
"""kill -9 of each component at random moments under a journaled writer, many times.

For each component (the sender in ``sync`` and in ``run``, breqd, bmig-nbd, breceive)
one rig runs ``--iterations`` iterations of tests/crashloop.py: the writer writes
through bmig-nbd, a sender ships, the component is killed with SIGKILL at a random
moment and started again, the writer stops, and a last ``bmigrate sync --threshold 0``
must leave every acknowledged write in the source and the target equal to it, with
nothing dirty in breqd. The table gives, per component, the iterations, the writes
acknowledged and checked, and the iterations that found a difference (listed after it).

    python bench/crashloop.py                      # 50 iterations of each component
    python bench/crashloop.py --quick              # 2 of each, as the test suite runs
    python bench/crashloop.py --iterations 5 --components sync,breqd --seed 7
    python bench/crashloop.py --json out.json

The test suite runs two iterations of each (tests/integration/test_crashloop.py).
Each component's rig lives in a temporary directory of its own, removed with everything
it started at the end; the script touches nothing outside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from benchlib import provenance, provenance_end, provenance_line, table  # noqa: E402
from tests.crashloop import COMPONENTS, Rig  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int,
                        help="iterations of each component [50; 2 with --quick]")
    parser.add_argument("--quick", action="store_true",
                        help="two iterations of each component (a smoke test)")
    parser.add_argument("--components", default=",".join(COMPONENTS),
                        help=f"comma-separated, of {', '.join(COMPONENTS)}")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--size-mib", type=int, default=32)
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    args = parser.parse_args()
    components = [c for c in args.components.split(",") if c]
    unknown = set(components) - set(COMPONENTS)
    if unknown:
        parser.error(f"unknown components: {', '.join(sorted(unknown))}")
    if args.iterations is None:
        args.iterations = 2 if args.quick else 50

    facts = provenance()
    print(f"bmig crash loop: seed {args.seed}, {args.iterations} iterations each",
          flush=True)
    print(provenance_line(facts), flush=True)
    rows, failures, results = [], [], []
    for component in components:
        started = time.monotonic()
        writes = bad = 0
        recoveries: dict[str, int] = {}
        with tempfile.TemporaryDirectory(prefix=f"bmig-crashloop-{component}-") as root:
            rig = Rig(root, args.size_mib << 20).start()
            try:
                for number in range(args.iterations):
                    seed = args.seed * 1_000_003 + COMPONENTS.index(component) * 10_007 \
                        + number
                    outcome = rig.iteration(component, number, seed)
                    writes += outcome.writes
                    if outcome.recovery:
                        recoveries[outcome.recovery] = recoveries.get(outcome.recovery, 0) + 1
                    if outcome.problems:
                        bad += 1
                        failures.append(outcome)
                        print(f"{component} #{number} (seed {seed}): "
                              + "; ".join(outcome.problems[:5]), flush=True)
            finally:
                rig.stop()
        seconds = time.monotonic() - started
        rows.append([component, args.iterations, writes, bad, f"{seconds:.0f}"])
        results.append({"component": component, "iterations": args.iterations,
                        "writes_checked": writes, "iterations_with_a_difference": bad,
                        "seconds": round(seconds, 1),
                        **({"recoveries": recoveries} if recoveries else {})})
        print(f"{component}: {args.iterations} iterations, {writes} writes, {bad} bad"
              + "".join(f"; {what}: {n}" for what, n in sorted(recoveries.items())),
              flush=True)
    out = {**facts, "seed": args.seed, "iterations": args.iterations}
    changed = provenance_end(out)
    print()
    print(table(["component", "iterations", "acked writes", "differences", "seconds"], rows))
    if changed:
        print(changed, file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**out, "results": results,
                       "failures": [o.__dict__ for o in failures]}, f, indent=2)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
