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
    if "membership" in r:
        m = r["membership"]
        q, tgt = m["rpo"], m["rpo_target_s"]
        _row(
            t,
            f"RPO at {m['rate']}/s, window {m['interval_s']:g} s + grace {m['grace_s']:g} s",
            f"p50 {q['p50']:.2f} s, p99 {q['p99']:.2f} s, max {q['max']:.2f} s",
            f"p99 <= {tgt:g} s",
            q["p99"] <= tgt,
        )
        f = m["failover"]
        _row(t, "failover after SIGKILL (total)", f"{f['total_s']:.1f} s", "", None)
        _row(
            t,
            "  session expiry (kill -> revocation)",
            f"{f['session_expiry_s']:.1f} s",
            "~ session.timeout 6 s",
            None,
        )
        _row(
            t,
            "  broker rebalance (revocation -> map)",
            f"{f['broker_rebalance_s']:.1f} s",
            "",
            None,
        )
        _row(
            t,
            "  Tandem's own (map -> numbering again)",
            f"{f['tandem_s']:.2f} s",
            "<= 1 s",
            f["tandem_s"] <= 1,
        )
        if f["redundancy_restored_s"] is not None:
            _row(
                t,
                "  redundancy restored after the kill",
                f"{f['redundancy_restored_s']:.1f} s (map + {f['redundancy_after_map_s']:.2f} s)",
                "",
                None,
            )
        j = m["join"]
        _row(
            t,
            "join: longest pause, portions that stayed / moved",
            f"{j['pause_stayed_s']:.1f} s / {j['pause_moved_s']:.1f} s",
            "",
            None,
        )
        _row(
            t,
            "  broker rebalance (revocation -> map)",
            f"{j['broker_rebalance_s']:.1f} s",
            "",
            None,
        )
        own = max(j["tandem_stayed_s"], j["tandem_moved_s"])
        _row(
            t,
            "  Tandem's own, stayed / moved",
            f"{j['tandem_stayed_s']:.2f} s / {j['tandem_moved_s']:.2f} s",
            "<= 0.5 s",
            own <= 0.5,
        )
        _row(
            t,
            "  verify --all, no sequence number reused",
            f"{m['verified']}, {m['reused_seqs']} reused",
            "True, 0",
            bool(m["verified"]) and m["reused_seqs"] == 0 if m["verified"] is not None else None,
        )
    if "memory" in r:
        mem = r["memory"]
        peak = mem["max_peak_rss_bytes"] / 2**20
        _row(
            t,
            f"worker RSS, {mem['records']:,} records in flight (peak of 3 workers)",
            f"{peak:,.0f} MiB",
            "bounded, < 1024 MiB",
            peak < 1024,
        )
        _row(
            t,
            "  held at the end: owners / mirrors (rest waits on the primary)",
            f"{mem['owner_held_end']:,.0f} / {mem['mirror_held_end']:,.0f}",
            "",
            None,
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
    if "membership" in r:
        m = r["membership"]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.4))
        xs = [x for x, _ in m["rpo_series"]]
        a1.plot(xs, [y for _, y in m["rpo_series"]], lw=1)
        a1.axhline(m["rpo_target_s"], color="r", ls="--", label="target p99")
        a1.set_xlabel("s")
        a1.set_ylabel("RPO (s)")
        a1.set_title(f"RPO at {m['rate']}/s: p99 {m['rpo']['p99']:.2f} s")
        a1.legend()
        f, j = m["failover"], m["join"]
        parts = [
            ("failover", [f["session_expiry_s"], f["broker_rebalance_s"], f["tandem_s"]]),
            ("join (moved)", [0.0, j["broker_rebalance_s"], j["tandem_moved_s"]]),
            ("join (stayed)", [0.0, j["broker_rebalance_s"], j["tandem_stayed_s"]]),
        ]
        labels = ["session expiry", "broker rebalance", "Tandem's own"]
        colors = ["#bbb", "#79c", "#2a7"]
        for i, lab in enumerate(labels):
            left = [sum(p[1][:i]) for p in parts]
            a2.barh(
                [p[0] for p in parts],
                [p[1][i] for p in parts],
                left=left,
                color=colors[i],
                label=lab,
            )
        a2.set_xlabel("s")
        a2.set_title("Failover and join, split")
        a2.legend(fontsize=8)
        fig.tight_layout()
        path = out / "membership.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        made.append(path)
    if "memory" in r:
        mem = r["memory"]
        fig, ax = plt.subplots(figsize=(6, 3.4))
        names = [k for k in mem["samples"][0] if k != "t"]
        ts = [s["t"] for s in mem["samples"]]
        for n in names:
            ax.plot(ts, [s[n]["rss"] / 2**20 for s in mem["samples"]], label=n)
        ax.axhline(1024, color="r", ls="--", label="1 GiB")
        ax.set_xlabel("s since workers started")
        ax.set_ylabel("RSS (MiB)")
        ax.set_title(f"Worker memory, {mem['records']:,} records in flight")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / "memory.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        made.append(path)
    return made
