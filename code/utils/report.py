"""Tables of results for people: GitHub markdown (summary.md, benchmark reports) and plain text (terminal).

Both align the first column left (names) and the others right (numbers), so columns of figures line up.
"""
from __future__ import annotations

from typing import Sequence

__all__ = ["markdown_table", "text_table"]


def _widths(header: Sequence, rows: Sequence[Sequence]) -> list[int]:
    return [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]


def _cells(cells: Sequence, widths: Sequence[int]) -> list[str]:
    return [str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]


def markdown_table(header: Sequence, rows: Sequence[Sequence]) -> str:
    """A GitHub markdown table of ``header`` and ``rows`` (cells of any type, shown with ``str``)."""
    widths = _widths(header, rows)

    def line(cells) -> str:
        return "| " + " | ".join(_cells(cells, widths)) + " |"
    # the separator row's colon right-aligns a column when rendered
    sep = "|" + "|".join(("-" * (w + 2)) if i == 0 else ("-" * (w + 1) + ":") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def text_table(header: Sequence, rows: Sequence[Sequence]) -> str:
    """The same table as plain text: columns two spaces apart, a rule of dashes under the header."""
    widths = _widths(header, rows)
    lines = ["  ".join(_cells(r, widths)) for r in [header, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
