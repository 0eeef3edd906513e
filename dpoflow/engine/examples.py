"""One input row -> the training items it makes: preference pairs (dpoflow.engine.pairs) or one unpaired example
(dpoflow.engine.unpaired), whichever shape the row has. With `data.format: auto` the shape is decided row by
row, so one file may hold both; a row of neither shape is rejected naming its fields."""

from __future__ import annotations

from dpoflow.base import layouts
from dpoflow.engine.pairs import Pair, Rejection, mapped, pairs_of
from dpoflow.engine.unpaired import Unpaired, looks_unpaired, to_example

Item = Pair | Unpaired | Rejection


def examples_of(where: str, row: dict, fmt: str = "auto", columns: dict[str, str] | None = None,
                pairing: str = "best_vs_worst", min_margin: float = 0.0,
                prefer: str = "better") -> tuple[str, list[tuple[str, Item]]]:
    """(the layout that read the row, its items as (where, pair, example or rejection))."""
    named = mapped(row, columns)
    layout = layouts.BY_NAME[fmt] if fmt != "auto" else layouts.detect(named)
    if layout is None and looks_unpaired(named):
        layout = layouts.BY_NAME["unpaired"]  # the closest: its rejection names the missing field
    if layout is not None and layout.shape == "unpaired":
        return layout.name, [(where, to_example(where, named))]
    return pairs_of(where, row, fmt, columns, pairing, min_margin, prefer)
