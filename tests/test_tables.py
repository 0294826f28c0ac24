"""The README's evidence tables (benchmarks/tables.py) rendered from the committed result JSON."""

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import tables


@pytest.mark.parametrize("task", ["commonsense", "math"])
def test_evidence_table_shows_every_finished_lr_point_and_the_pick(task):
    d = json.loads((BENCH / "results" / f"finetune_evidence_{task}.json").read_text())
    text = tables.finetune_evidence(d, task)
    assert "\n\n\n" not in text  # a table left out leaves one blank line, not two
    done = {k for k, u in d["units"].items() if k.startswith("lr/") and u.get("val_loss") is not None}
    rows = {r[0]: r for r in tables.lr_grid_rows(d)}
    assert set(rows) == {k.split("/")[1] for k in done}
    for method, row in rows.items():
        grid, picked = d["meta"]["lr_grids"][method], d["meta"]["chosen_lrs"].get(method)
        cells = row[1].split(" · ")
        assert len(cells) == len(grid)
        for lr, cell in zip(grid, cells):
            loss = d["units"].get(f"lr/{method}/{lr:g}", {}).get("val_loss")
            assert cell.strip("*") == f"{lr:g}: " + ("—" if loss is None else f"{loss:.4f}")
            assert cell.startswith("**") == (lr == picked)
        assert row[2] == (f"{picked:g}" if picked else "—")
        assert f"| {method} | {row[1]} |" in text
