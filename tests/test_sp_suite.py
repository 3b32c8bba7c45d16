"""benchmarks/sp_suite.py at its tiniest size: the outputs exist and the measured bytes are the predicted ones."""
import csv
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import sp_suite  # noqa: E402


@pytest.mark.slow
def test_suite_bytes_match_the_cost_model(tmp_path):
    out = str(tmp_path / "sp_suite")
    sp_suite.main(["--n", "256", "--p", "4", "--repeats", "1", "--out", out])
    with open(f"{out}.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * 5 + 3 * 3  # softmax: 4 algorithms x 5 masks; linear: 3 x 3
    for row in rows:
        case = f"{row['family']} {row['mask']} {row['algorithm']}"
        assert float(row["fwd_bytes"]) == pytest.approx(float(row["pred_fwd_bytes"]), rel=1e-9), case
        assert float(row["bwd_bytes"]) == pytest.approx(float(row["pred_bwd_bytes"]), rel=1e-9), case
    names = [".md", "_predicted.png"] + [f"_{plot}_{family}.png" for plot in ("throughput", "bytes", "memory")
                                         for family in ("softmax", "linear")]
    assert all(os.path.getsize(out + name) > 0 for name in names)
