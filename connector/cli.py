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
err = Console(stderr=True)

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
    from connector.status import map_table, members_rows, members_table

    settings = _settings(config)

    async def show() -> None:
        view = await read_control(settings.backup_cluster.aiokafka(), settings.control_topic)
        stale = int(settings.source.session_timeout_ms + 3000 * settings.announce_interval_s)
        rows = members_rows(view, stale)
        if as_json:
            m = view.latest_map
            print(json.dumps({"members": rows, "map": m.model_dump() if m else None}, indent=2))
            return
        out = Console()
        out.print(members_table(rows))
        out.print(map_table(view))

    _run(show())


@app.command()
def demo(
    records: Annotated[int, typer.Option(help="records to produce")] = 20_000,
    workers: Annotated[int, typer.Option(help="workers to run")] = 3,
) -> None:
    """The one-command tour: embedded broker, producers, workers, the map and the counts."""
    from connector.demo import run_demo

    raise typer.Exit(run_demo(records=records, workers=workers))


if __name__ == "__main__":
    app()
