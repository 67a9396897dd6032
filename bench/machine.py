"""What every bench script writes beside its numbers: the command that regenerates them,
the date (UTC) and the machine (cores, RAM, torch version and threads, load average)."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from pathlib import Path


def command(module: str | None = None) -> str:
    """The command line that ran this script, as ``python -m bench.NAME ARGS``."""
    name = module or Path(sys.argv[0]).stem
    if not name.startswith("bench."):
        name = f"bench.{name}"
    return " ".join(["python", "-m", name, *(shlex.quote(a) for a in sys.argv[1:])])


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def ram_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return float("nan")


def machine() -> str:
    """One line: CPU, cores, RAM, torch version and threads, load average now."""
    import torch

    try:
        load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        load = "n/a"
    return (f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores, {ram_gib():.0f} GiB RAM, "
            f"Python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} "
            f"threads), load average {load}")


def header(module: str | None = None) -> list[str]:
    """``Command: ...``, ``Date: ...``, ``Machine: ...`` lines."""
    return [f"Command: `{command(module)}`", f"Date: {utc_now()}", f"Machine: {machine()}"]


def record(module: str | None = None) -> dict:
    return {"command": command(module), "date": utc_now(), "machine": machine()}


def write_latest(path: str | Path, lines: list[str], *, module: str | None = None, append: bool = True) -> Path:
    """Write (``append``: add) one block to a ``*_latest.txt`` file: the header lines, then
    ``lines``; blocks are separated by a blank line, newest last."""
    path = Path(path)
    block = "\n".join(header(module) + list(lines)) + "\n"
    if append and path.exists() and path.read_text().strip():
        block = path.read_text().rstrip("\n") + "\n\n" + block
    path.write_text(block)
    return path


def update_doc(path: str | Path, key: str, lines: list[str], *, module: str | None = None) -> Path:
    """Replace the block between ``<!-- generated: KEY -->`` and ``<!-- end: KEY -->`` in the
    markdown file ``path`` by the header lines and ``lines`` (a fenced block); the markers
    must be there already (nothing else in the file is touched)."""
    path = Path(path)
    text = path.read_text()
    start, end = f"<!-- generated: {key} -->", f"<!-- end: {key} -->"
    if start not in text or end not in text:
        raise SystemExit(f"{path} has no block {start} ... {end}; add the two markers where the "
                         "table goes.")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    command_line, date, machine_line = header(module)
    body = "\n".join([start, "", f"{command_line}; {date.removeprefix('Date: ')}.", "",
                      f"{machine_line}.", "", "```", *lines, "```", "", end])
    path.write_text(head + body + tail)
    return path


def publish(lines: list[str], module: str, *, latest: str | None = None, doc: str | None = None,
            key: str | None = None, append: bool = True) -> None:
    """Write ``lines`` to the script's latest file and/or its block ``key`` (default: the
    module name) of a docs page, each with the command, date and machine, and say where."""
    if latest:
        write_latest(latest, lines, module=module, append=append)
        print(f"wrote {latest}")
    if doc:
        update_doc(doc, key or module, lines, module=module)
        print(f"updated {doc}")


def markdown_table(frame) -> str:
    """A pandas DataFrame as a markdown table (cells as printed by ``str``)."""
    rows = [list(map(str, frame.columns)), ["---"] * len(frame.columns)]
    rows += [[str(v) for v in row] for row in frame.itertuples(index=False)]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)
