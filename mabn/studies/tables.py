"""Reading the study's markdown tables back (the committed results of studies whose per-run
values were not kept)."""

from __future__ import annotations


def study_cells(table: str) -> dict:
    """(norm, batch) -> (mean, half-width) of the study's rows in ``fashion_study.md``."""
    rows = [line.strip("| ").split(" | ") for line in table.splitlines() if line.startswith("| ")]
    batches = [int(cell.split()[-1]) for cell in rows[0][1:] if cell.startswith("batch ")]  # not the price column
    cells = {}
    for norm, *values in rows[1:]:
        for batch, value in zip(batches, values):
            if " ± " in value:  # the study's rows (the paper's table below has plain numbers)
                mean, half = value.split(" ± ")
                cells[norm, batch] = (float(mean), float(half))
    return cells
