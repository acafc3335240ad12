"""How every command prints: rich tables and colours for people, ``--json`` for scripts.

Results go to stdout, messages and spinners to stderr, so ``aqsh get ID --json | jq`` and
``aqsh run … --follow > out.log`` carry only the data. rich turns colour off by itself when
stdout is not a terminal (and honours NO_COLOR).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text


def _width(stream: Any) -> int | None:
    """A terminal's own width; piped output is not squeezed into rich's default 80 columns,
    so a table in a log or a grep keeps one row a line."""
    if stream.isatty():
        return None
    try:
        return int(os.environ.get("COLUMNS", "200"))
    except ValueError:
        return 200


out = Console(highlight=False, soft_wrap=True, width=_width(sys.stdout))
err = Console(stderr=True, highlight=False, soft_wrap=True, width=_width(sys.stderr))

json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print machine-readable JSON instead of tables.")


class CliError(click.ClickException):
    """A failure the user can act on: printed as one line, ``aqsh: <message>``."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]  # click reads it per instance

    def show(self, file: Any = None) -> None:
        # A Text, not markup: a message quoting a pattern like [a-z]+ must print as it is.
        err.print(Text.assemble(("aqsh:", "red"), " ", self.message))


def print_json(value: Any) -> None:
    # Plain print, not rich: JSON must reach a pipe byte for byte, unwrapped and uncoloured.
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def table(columns: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None,
          ) -> None:
    grid = Table(title=title, header_style="bold", title_justify="left", box=None,
                 pad_edge=False)
    for column in columns:
        grid.add_column(column, overflow="fold")
    count = 0
    for row in rows:
        grid.add_row(*(cell_text(cell) for cell in row))
        count += 1
    if count == 0:
        out.print(f"[dim]{title + ': ' if title else ''}nothing to show[/dim]")
        return
    out.print(grid)


def fields(pairs: Iterable[tuple[str, Any]], title: str | None = None) -> None:
    """A two-column key/value table, for one object (a task, a queue)."""
    grid = Table(title=title, show_header=False, box=None, title_justify="left",
                 pad_edge=False)
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    for key, value in pairs:
        grid.add_row(key, cell_text(value))
    out.print(grid)


def cell_text(value: Any) -> str | Text:
    """Data is escaped: a payload or a task name holding ``[bold]`` is shown as typed."""
    if isinstance(value, Text):
        return value
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict | list):
        return escape(json.dumps(value, ensure_ascii=False))
    return escape(str(value))


def iso_from_unix(seconds: float | None) -> str | None:
    if not seconds:
        return None
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


def human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def human_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 120:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


STATE_STYLE = {
    "completed": "green", "active": "cyan", "pending": "blue", "scheduled": "magenta",
    "retry": "yellow", "archived": "red", "canceled": "red", "aggregating": "blue",
    "canceling": "yellow",
}


def state_text(state: str) -> Text:
    return Text(state, style=STATE_STYLE.get(state, ""))


@contextlib.contextmanager
def spinner(message: str) -> Iterator[None]:
    """A spinner on stderr while waiting, only where a person is watching."""
    if err.is_terminal:
        with err.status(message):
            yield
    else:
        yield
