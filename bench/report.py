"""The figures against their targets: a table for people, PNG plots for the README."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def _row(t: Table, what: str, value: str, target: str, ok: bool | None) -> None:
    verdict = "" if ok is None else ("[green]met[/green]" if ok else "[red]missed[/red]")
    t.add_row(what, value, target, verdict)


def table(r: dict[str, Any]) -> None:
    t = Table(title=f"Tandem benchmarks ({'quick' if r['quick'] else 'full'})")
    for c in ("figure", "measured", "target", ""):
        t.add_column(c)
    if "throughput" in r:
        tp = r["throughput"]
        tandem = tp["tandem"]
        relay = sum(x["rate"] for x in tp["relay"]) / len(tp["relay"])
        _row(
            t,
            f"throughput, {tp['records']:,} x 1 KB, {tp['partitions']} partitions",
            f"Tandem {tandem['rate']:,.0f}/s vs relay {relay:,.0f}/s",
            "",
            None,
        )
        _row(
            t,
            "throughput ratio Tandem / relay (from worker start)",
            f"{tp['ratio']:.2f}",
            ">= 0.45",
            tp["ratio"] >= 0.45,
        )
        _row(
            t,
            "  same, from the first map (join excluded)",
            f"{tp['ratio_from_map']:.2f}",
            ">= 0.45",
            tp["ratio_from_map"] >= 0.45,
        )
        _row(
            t,
            "records/s per core: Tandem / relay",
            f"{tandem['per_core']:,.0f} / "
            f"{sum(x['per_core'] for x in tp['relay']) / len(tp['relay']):,.0f} "
            f"= {tp['per_core_ratio']:.2f}",
            "",
            None,
        )
        if "verified" in tandem:
            _row(
                t,
                "tandem verify --all after the run",
                "ok" if tandem["verified"] else "FAILED",
                "ok",
                tandem["verified"],
            )
    Console().print(t)


def plots(r: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    if "throughput" in r:
        tp = r["throughput"]
        fig, ax = plt.subplots(figsize=(6, 3.2))
        names = ["relay (before)", "Tandem", "relay (after)"]
        rates = [tp["relay"][0]["rate"], tp["tandem"]["rate"], tp["relay"][1]["rate"]]
        ax.bar(names, rates, color=["#999", "#2a7", "#999"])
        ax.set_ylabel("records/s (1 KB)")
        ax.set_title(f"Throughput, {tp['records']:,} records; Tandem/relay = {tp['ratio']:.2f}")
        fig.tight_layout()
        path = out / "throughput.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        made.append(path)
    return made
