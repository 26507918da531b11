"""Printing the stop report: plain text, coloured by rich on a terminal."""

from __future__ import annotations

import io


def print_report(ui, text: str, code: int) -> None:
    """The report on stderr, through UI: queued for its writer (the live status line is
    cleared first), so a stalled reader or a terminal that hung up can neither block nor
    fail it."""
    ui.block(colour_report(text, code) if ui.color else text)


def colour_report(text: str, code: int) -> str:
    """TEXT with rich's terminal colours, rendered into a string (never to a stream)."""
    from rich.console import Console
    from rich.text import Text

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, highlight=False, width=10_000)
    for line in text.splitlines():
        style = ""
        if line.startswith("exit code"):
            style = "bold green" if code == 0 else "bold red"
        elif line.startswith("VRAM"):
            style = "green" if " released" in line else "yellow"
        elif line.startswith("──"):
            style = "bold"
        elif "SURVIVED" in line:
            style = "bold red"
        console.print(Text(line, style=style), soft_wrap=True)
    return buf.getvalue()
