"""The one checkpoint format (expertscope.checkpoint.RowCheckpoint): rows read back bit-identical, a torn last
line ignored, the last meta kept, another run's checkpoint refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from expertscope.checkpoint import RowCheckpoint
from expertscope.errors import ConfigError, OutputError


def test_rows_round_trip_bit_identical_and_a_torn_line_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "ck.jsonl"
    g = np.random.default_rng(0)
    rows = {("exact", i): g.normal(size=(3, 4)) * 10.0 ** g.integers(-12, 3) for i in range(5)}
    rows[("exact", 2)][0, 1] = np.nan  # experts not perturbed stay NaN
    with RowCheckpoint(path, "fp", resume=False) as ck:
        for key, v in rows.items():
            ck.add(key, v)
        ck.set_meta({"stats": {"a": 1}})
        ck.set_meta({"stats": {"a": 2}})
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('{"key": ["exact", 9], "shape": [3, 4], "values": [0.1, 0.')  # the process died here
    with RowCheckpoint(path, "fp", resume=True) as back:
        assert set(back.done) == set(rows) and back.meta == {"stats": {"a": 2}}
        for key, v in rows.items():
            assert back.done[key].shape == v.shape
            np.testing.assert_array_equal(back.done[key], v)  # bit-identical, NaN included
        back.add(("exact", 9), np.ones(2))
    assert ("exact", 9) in RowCheckpoint(path, "fp", resume=True).done
    path.write_text(path.read_text().rstrip("\n"))  # a whole last row whose newline was never written
    with RowCheckpoint(path, "fp", resume=True) as again:
        again.add(("exact", 10), np.zeros(1))
    assert {("exact", 9), ("exact", 10)} <= set(RowCheckpoint(path, "fp", resume=True).done)


def test_another_runs_checkpoint_or_a_foreign_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ck.jsonl"
    RowCheckpoint(path, "fp", resume=False).close()
    with pytest.raises(ConfigError, match="other inputs or settings"):
        RowCheckpoint(path, "other", resume=True)
    path.write_text("PK\x03\x04 not a checkpoint\n")
    with pytest.raises(OutputError, match="not an expertscope checkpoint"):
        RowCheckpoint(path, "fp", resume=True)
    RowCheckpoint(path, "fp", resume=False).close()  # without resume a new one starts
    assert RowCheckpoint(path, "fp", resume=True).done == {}
