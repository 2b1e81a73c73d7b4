"""Domain sources: file formats, field mapping, presets and synthetic specs, and their errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from expertscope.data.sources import PRESETS, load_domain, load_domains, parse_domain_spec
from expertscope.errors import DataError

ROWS = [{"q": "What is 2+2?", "a": "4", "lab": "joy"}, {"q": "And 3*3?", "a": "9", "lab": "anger"}]


@pytest.fixture
def files(tmp_path):
    paths = {}
    paths["jsonl"] = tmp_path / "d.jsonl"
    paths["jsonl"].write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    paths["json"] = tmp_path / "d.json"
    paths["json"].write_text(json.dumps(ROWS))
    paths["csv"] = tmp_path / "d.csv"
    pd.DataFrame(ROWS).to_csv(paths["csv"], index=False)
    paths["parquet"] = tmp_path / "d.parquet"
    pd.DataFrame(ROWS).to_parquet(paths["parquet"])
    return paths


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet"])
def test_every_format_maps_fields_the_same(files, kind) -> None:
    dom = load_domain(f"m={files[kind]}?text=q&answer=a&label=lab&task=math")
    assert dom.name == "m" and dom.task == "math" and len(dom) == 2
    assert [e.text for e in dom] == ["What is 2+2?", "And 3*3?"]
    assert [e.answer for e in dom] == ["4", "9"] and [e.label for e in dom] == ["joy", "anger"]


def test_limit_and_global_fields(files) -> None:
    dom = load_domain(f"m={files['jsonl']}", fields={"text": "q"}, limit=1)
    assert len(dom) == 1 and dom.examples[0].answer is None


def test_spec_parsing() -> None:
    assert parse_domain_spec("x=a/b.jsonl?text=t&label=l") == ("x", "a/b.jsonl", {"text": "t", "label": "l"})
    with pytest.raises(DataError, match="not NAME=SOURCE"):
        parse_domain_spec("a/b.jsonl")
    with pytest.raises(DataError, match="unknown field key 'txt'"):
        parse_domain_spec("x=a.jsonl?txt=q")
    with pytest.raises(DataError, match="domain name"):
        parse_domain_spec("bad name=a.jsonl")


def test_errors_name_the_problem(files, tmp_path) -> None:
    with pytest.raises(DataError, match=r"no field 'text'.*--text-field"):
        load_domain(f"m={files['jsonl']}")
    with pytest.raises(DataError, match="not found"):
        load_domain(f"m={tmp_path / 'missing.jsonl'}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2 is not valid JSON"):
        load_domain(f"m={bad}")
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"text": "  "}\n')
    with pytest.raises(DataError, match="empty 'text'"):
        load_domain(f"m={blank}")
    other = tmp_path / "d.xml"
    other.write_text("<x/>")
    with pytest.raises(DataError, match="unsupported data file type"):
        load_domain(f"m={other}")
    with pytest.raises(DataError, match="used twice"):
        load_domains([f"m={files['jsonl']}?text=q", f"m={files['csv']}?text=q"])


def test_presets_fail_offline_with_a_fix(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="download it and pass a local file"):
        load_domain("g=preset:gsm8k", limit=3)
    with pytest.raises(DataError, match="unknown preset"):
        load_domain("g=preset:nope")


def test_preset_converters_format_rows_for_their_tasks() -> None:
    g = PRESETS["gsm8k"].convert({"question": "Q?", "answer": "step 1\n#### 1,234"})
    assert g.answer == "1234" and g.solution.endswith("1,234")
    m = PRESETS["mmlu"].convert({"question": "Q?", "choices": ["a", "b", "c", "d"], "answer": 2, "subject": "law"})
    assert m.label == "C" and m.choices == ("a", "b", "c", "d")
    e = PRESETS["emotion"].convert({"text": "so happy", "label": 1})
    assert e.label == "joy"


def test_synthetic_spec_is_deterministic_and_tasked() -> None:
    a = load_domain("k=synthetic:knowledge@validation", limit=5, seed=1)
    b = load_domain("k=synthetic:knowledge@validation", limit=5, seed=1)
    assert a.task == "multiple_choice" and [e.text for e in a] == [e.text for e in b]
    assert all(t.rstrip().endswith("Answer:") for t in a.texts)


def test_atomic_writes_leave_nothing_behind_on_error_and_use_normal_permissions(tmp_path) -> None:
    import os
    import stat

    from expertscope.io import atomic_write

    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError), atomic_write(target) as fh:
        fh.write("half")
        raise RuntimeError("interrupted")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_write(target) as fh:
        fh.write("{}")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
