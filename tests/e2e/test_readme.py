"""The README's Python block runs as written (the demo model, small limits)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_readme_python_block_runs_as_written() -> None:
    import expertscope as es

    blocks = _python_blocks(README.read_text())
    assert len(blocks) == 1, "the README's Python section is one block: keep it runnable as a whole"
    (block,) = blocks
    ns: dict = {}
    exec(compile(block, str(README), "exec"), ns)  # the README's own example, as written
    # What the block promises, checked against the objects it made.
    assert set(ns["frame"]["domain"]) == {"emotion", "knowledge", "math"}
    assert isinstance(ns["table"], es.DomainExpertTable) and isinstance(ns["drivers"], es.DriverTable)
    assert ns["result"].n == 8 and 0.0 <= ns["result"].accuracy <= 1.0
    call = ns["call"]
    assert call.logits.shape[0] == call.indices.shape[0] == call.weights.shape[0] > 0
