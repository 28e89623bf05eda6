"""The ``tandem`` command."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from connector.config import Settings, load_settings
from connector.errors import TandemError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
err = Console(stderr=True, soft_wrap=True)  # messages print whole, never folded

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config; TANDEM_* env vars override it")
]


def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except TandemError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from exc


def _run(coro: object) -> None:
    try:
        asyncio.run(coro)  # type: ignore[arg-type]
    except TandemError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(1) from exc


def _logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiokafka").setLevel(logging.WARNING)


@app.command()
def broker(
    port: Annotated[int | None, typer.Option(help="port on 127.0.0.1; default: a free one")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="where the broker keeps its files")] = None,
) -> None:
    """Run the embedded Kafka-protocol broker (Tansu) until Ctrl-C."""
    from connector.broker import run_broker

    raise typer.Exit(run_broker(port, data_dir))


@app.command()
def worker(
    config: ConfigOpt = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")] = "INFO",
) -> None:
    """Run one backup worker until SIGTERM or Ctrl-C."""
    from connector.worker import run_worker

    settings = _settings(config)
    _logging(log_level)
    _run(run_worker(settings))


@app.command()
def status(
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Show the group's members, the portion map and what each worker holds."""
    from connector.control import read_control
    from connector.coordinator import read_manifests
    from connector.status import map_table, members_rows, members_table, rpo_seconds

    settings = _settings(config)

    async def show() -> None:
        client = settings.backup_cluster.aiokafka()
        view = await read_control(client, settings.control_topic)
        manifests = await read_manifests(client, settings.sets_topic)
        last = manifests[max(manifests)] if manifests else None
        stale = int(settings.source.session_timeout_ms + 3000 * settings.announce_interval_s)
        rows = members_rows(view, stale)
        m = view.latest_map
        unprotected = [
            f"{p.topic}[{p.partition}]" for p in (m.portions if m else []) if p.mirror is None
        ]
        summary = {
            "last_set": last.set_id if last else None,
            "rpo_s": rpo_seconds(last),
            "unprotected": unprotected,
        }
        if as_json:
            print(
                json.dumps(
                    {"members": rows, "map": m.model_dump() if m else None, **summary}, indent=2
                )
            )
            return
        out = Console()
        out.print(members_table(rows))
        out.print(map_table(view))
        out.print(
            f"last committed set: {summary['last_set']}   RPO: {summary['rpo_s']} s   "
            f"unprotected portions: {', '.join(unprotected) or 'none'}"
        )

    _run(show())


@app.command()
def sets(
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep listing new sets")] = False,
) -> None:
    """List committed sets (a set exists when its manifest is written)."""
    from connector.coordinator import read_manifests
    from connector.status import sets_rows, sets_table

    settings = _settings(config)

    async def show() -> None:
        client = settings.backup_cluster.aiokafka()
        seen = -1
        while True:
            manifests = await read_manifests(client, settings.sets_topic)
            new = {k: v for k, v in manifests.items() if k > seen}
            if as_json:
                for row in sets_rows(new):
                    print(json.dumps(row), flush=True)
            elif new:
                Console().print(sets_table(sets_rows(new)))
            seen = max(manifests, default=seen)
            if not follow:
                return
            await asyncio.sleep(1)

    _run(show())


@app.command()
def verify(
    config: ConfigOpt = None,
    set_id: Annotated[int | None, typer.Option("--set", help="verify this set only")] = None,
    all_sets: Annotated[bool, typer.Option("--all", help="verify every committed set")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Check primary, backup and manifests independently; exit 1 on any mismatch."""
    from connector.verify import render
    from connector.verify import verify as run_verify

    settings = _settings(config)
    try:
        result = asyncio.run(run_verify(settings, set_id=set_id, all_sets=all_sets))
    except TandemError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from exc
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        render(result, Console())
    raise typer.Exit(0 if result.ok else 1)


@app.command()
def restore(
    to: Annotated[str, typer.Option("--to", help="bootstrap servers of the target cluster")],
    config: ConfigOpt = None,
    set_id: Annotated[int | None, typer.Option("--set", help="restore up to this set")] = None,
    at: Annotated[
        str | None,
        typer.Option("--time", help="the last set ending at or before T (ISO-8601 or epoch ms)"),
    ] = None,
    topic_map: Annotated[
        list[str] | None, typer.Option("--topic-map", help="SOURCE:TARGET topic, repeatable")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="show the plan, write nothing")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="append after foreign data in a non-empty target")
    ] = False,
    include_unsecured: Annotated[
        bool,
        typer.Option(
            "--include-unsecured",
            help="also the mirrored updates past the last set (not a consistent cut)",
        ),
    ] = False,
    max_rate: Annotated[
        float | None, typer.Option(help="at most this many records per second", min=1)
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable summary")] = False,
) -> None:
    """Write a committed set (default: the last) to a target cluster; resumable, verified.

    Exit 0: restored and verified (or a dry run); 1: runtime error or verification
    mismatch; 2: bad usage or config (e.g. no such set, target does not fit).
    """
    from connector.config import ClusterConfig
    from connector.errors import UsageError
    from connector.restore import restore as run_restore
    from connector.restore_plan import RestoreRequest, parse_time, parse_topic_map
    from connector.restore_plan import render as render_restore
    from connector.verify import progress_bar

    settings = _settings(config)
    out = Console(stderr=as_json)
    try:
        request = RestoreRequest(
            target=ClusterConfig(bootstrap_servers=to),
            set_id=set_id,
            at_ms=parse_time(at) if at is not None else None,
            topic_map=parse_topic_map(topic_map or []),
            dry_run=dry_run,
            force=force,
            include_unsecured=include_unsecured,
            max_rate=max_rate,
        )
        with progress_bar(out, "restore") as progress:
            result = asyncio.run(run_restore(settings, request, progress))
    except UsageError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from exc
    except TandemError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(1) from exc
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        render_restore(result, out)
    raise typer.Exit(0 if result.ok else 1)


@app.command()
def demo(
    seconds: Annotated[float, typer.Option(help="how long producers run")] = 60,
    rate: Annotated[int, typer.Option(help="records per second, all producers")] = 2000,
    workers: Annotated[int, typer.Option(help="workers to run")] = 3,
) -> None:
    """The one-command tour: producers, workers, a join, a SIGKILL, verify and the figures."""
    from connector.demo import run_demo

    raise typer.Exit(run_demo(seconds=seconds, rate=rate, workers=workers))


if __name__ == "__main__":
    app()
