"""What ``tandem status`` shows: the group as it published itself on the control topic."""

from __future__ import annotations

import time
from typing import Any

from rich.table import Table

from connector.control import ControlView
from connector.messages import Manifest, MemberAnnouncement, OwnedPortion


def _state(a: MemberAnnouncement, live: bool, now_ms: int) -> str:
    """up, joining (waiting for a handover), leaving (handing over), left, or silent."""
    if a.leaving:
        return "leaving" if now_ms - a.at_ms <= 5_000 else "left"
    if not live:
        return "silent"
    return "joining" if a.joining else "up"


def members_rows(view: ControlView, stale_ms: int) -> list[dict[str, Any]]:
    now = int(time.time() * 1000)
    live = view.live(now, stale_ms)
    rows = []
    for name, a in sorted(view.announcements.items(), key=lambda kv: kv[1].slot):
        rows.append(
            {
                "member": name,
                "slot": a.slot,
                "state": _state(a, name in live, now),
                "epoch": a.epoch,
                "owned": len(a.owned),
                "sequenced": sum(o.next_seq for o in a.owned),
                "mirrored_held": sum(m.held for m in a.mirrored),
                "in_flight": sum(o.in_flight for o in a.owned),
                "unprotected": sum(1 for o in a.owned if unprotected(o)),
                "last_seen_s": round((now - a.at_ms) / 1000, 1),
            }
        )
    return rows


def unprotected(o: OwnedPortion) -> bool:
    """Updates of this portion not yet secured that its current mirror does not hold.

    The oldest unsecured update is the one that matters: newer ones are in flight for a
    moment in normal operation, but the oldest has long been acknowledged unless the
    mirror changed and the re-send has not landed yet.
    """
    if o.in_flight == 0:
        return False
    if o.mirror is None:
        return True
    oldest = o.next_seq - o.in_flight
    return not any(
        r.mirror == o.mirror and r.first_seq <= oldest <= r.last_seq for r in o.mirrored_ranges
    )


def members_table(rows: list[dict[str, Any]], title: str = "members") -> Table:
    table = Table(title=title)
    columns = [
        ("member", "left"),
        ("slot", "right"),
        ("state", "left"),
        ("epoch", "right"),
        ("owned", "right"),
        ("sequenced", "right"),
        ("mirrored_held", "right"),
        ("in_flight", "right"),
        ("unprotected", "right"),
        ("last_seen_s", "right"),
    ]
    for name, justify in columns:
        table.add_column(name.replace("_", " "), justify=justify)  # type: ignore[arg-type]
    for row in rows:
        table.add_row(*(str(row[c]) for c, _ in columns))
    return table


def map_table(view: ControlView) -> Table:
    m = view.latest_map
    table = Table(
        title=f"portion map, epoch {m.epoch if m else '-'}, coordinator "
        f"{m.coordinator if m else '-'}"
    )
    for col in ("portion", "owner", "mirror"):
        table.add_column(col)
    if m is not None:
        for p in sorted(m.portions, key=lambda p: (p.topic, p.partition)):
            table.add_row(f"{p.topic}[{p.partition}]", p.owner, p.mirror or "UNPROTECTED")
    return table


def sets_rows(manifests: dict[int, Manifest]) -> list[dict[str, Any]]:
    return [
        {
            "set": m.set_id,
            "window_end": time.strftime("%H:%M:%S", time.localtime(m.window_end_ms / 1000)),
            "records": sum(p.count for p in m.portions),
            "late": m.late,
            "portions": len(m.portions),
            "epoch": m.epoch,
            "coordinator": m.coordinator,
            "commit_lag_s": round((m.committed_ms - m.window_end_ms) / 1000, 2),
        }
        for m in (manifests[k] for k in sorted(manifests))
    ]


def sets_table(rows: list[dict[str, Any]], title: str = "committed sets") -> Table:
    table = Table(title=title)
    for col in (
        "set",
        "window_end",
        "records",
        "late",
        "portions",
        "epoch",
        "coordinator",
        "commit_lag_s",
    ):
        table.add_column(col.replace("_", " "), justify="left" if col == "coordinator" else "right")
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    return table


def rpo_seconds(last: Manifest | None, now_ms: int | None = None) -> float | None:
    """Age of the newest update in the last committed set: what a restore now would lose."""
    if last is None:
        return None
    newest = max((p.max_timestamp for p in last.portions), default=-1)
    if newest < 0:
        newest = last.window_end_ms
    return round(((now_ms or int(time.time() * 1000)) - newest) / 1000, 2)
