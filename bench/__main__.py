"""``python -m bench [--quick] [--json] [--only NAME ...]``: every figure in one run.

Prints a table of figures against their targets; ``--json`` prints the raw measurements
instead; PNG plots and ``results.json`` go to ``docs/bench/`` (``--plots DIR``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import membership, memory, report, throughput

SCENARIOS = ("throughput", "membership", "memory")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="smaller runs, about 2-3 minutes")
    ap.add_argument("--json", action="store_true", help="print the measurements as JSON")
    ap.add_argument("--only", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    ap.add_argument("--plots", type=Path, default=Path("docs/bench"), help="where PNGs go")
    ap.add_argument("--no-verify", action="store_true", help="skip tandem verify after runs")
    a = ap.parse_args(argv)
    results: dict[str, Any] = {"quick": a.quick, "started": time.time()}
    with tempfile.TemporaryDirectory(prefix="tandem-bench-") as tmp:
        work = Path(tmp)
        if "throughput" in a.only:
            n = 100_000 if a.quick else 240_000
            results["throughput"] = throughput.measure(work, n, check=not a.no_verify)
        if "membership" in a.only:
            results["membership"] = membership.measure(work, a.quick, check=not a.no_verify)
        if "memory" in a.only:
            results["memory"] = memory.measure(work, 1_000_000, 45 if a.quick else 90)
    results["finished"] = time.time()
    a.plots.mkdir(parents=True, exist_ok=True)
    results["plots"] = [str(p) for p in report.plots(results, a.plots)]
    (a.plots / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    if a.json:
        json.dump(results, sys.stdout, indent=1)
        print()
    else:
        report.table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
