"""Printing the stop report: plain text, coloured by rich on a terminal."""

from __future__ import annotations


def print_report(ui, text: str, code: int) -> None:
    """The report on stderr (through UI so the live status line is cleared first)."""
    if not ui.color:
        ui.block(text)
        return
    from rich.console import Console
    from rich.text import Text

    console = Console(stderr=True, highlight=False)
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
