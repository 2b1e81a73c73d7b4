"""Disjoint discovery / training / confirmation parts of every source (docs/methods.md, "Parts")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from expertscope.data.parts import digest, item_hash, part_of, select_part
from expertscope.data.sources import load_domain
from expertscope.data.types import Domain, Example
from expertscope.errors import DataError


def _file(path: Path, n: int = 400, dup: int = 0) -> Path:
    rows = [{"text": f"item number {i} says something", "label": ["pos", "neg"][i % 2]} for i in range(n)]
    rows += [rows[0]] * dup
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_parts_are_disjoint_cover_the_source_and_follow_the_shares(tmp_path: Path) -> None:
    f = _file(tmp_path / "a.jsonl")
    got = {p: load_domain(f"a={f}?task=classification", part=p, part_seed=0) for p in ("discovery", "train", "confirm")}
    hashes = {p: {item_hash(e) for e in d.examples} for p, d in got.items()}
    assert not hashes["discovery"] & hashes["train"] and not hashes["discovery"] & hashes["confirm"]
    assert not hashes["train"] & hashes["confirm"]
    assert sum(len(h) for h in hashes.values()) == 400
    # the shares, within binomial noise of 400 items (3 sd)
    for p, share in (("discovery", 0.6), ("train", 0.2), ("confirm", 0.2)):
        assert abs(len(hashes[p]) / 400 - share) < 3 * (share * (1 - share) / 400) ** 0.5, (p, len(hashes[p]))


def test_an_items_part_depends_on_its_text_and_the_seed_only(tmp_path: Path) -> None:
    """Stable when --limit changes (the limit takes the first items of the part) and when rows are reordered;
    duplicates share a part; another seed draws other parts."""
    f = _file(tmp_path / "a.jsonl")
    full = load_domain(f"a={f}", part="confirm").examples
    assert load_domain(f"a={f}", part="confirm", limit=10).examples == full[:10]
    rows = [json.loads(x) for x in f.read_text().splitlines()][::-1]
    g = tmp_path / "reversed.jsonl"
    g.write_text("\n".join(json.dumps(r) for r in rows))
    assert {item_hash(e) for e in load_domain(f"a={g}", part="confirm").examples} == {item_hash(e) for e in full}
    other = load_domain(f"a={f}", part="confirm", part_seed=1).examples
    assert {item_hash(e) for e in other} != {item_hash(e) for e in full}
    d = _file(tmp_path / "dup.jsonl", n=50, dup=5)
    parts = {part_of(item_hash(e), 0, (0.6, 0.2, 0.2)) for e in load_domain(f"a={d}").examples
             if e.text == "item number 0 says something"}
    assert len(parts) == 1


def test_the_digest_is_order_free_and_counts_items() -> None:
    a, b = Example("one"), Example("two")
    assert digest([a, b]) == digest([b, a]) and digest([a, b])["n"] == 2 and digest([a]) != digest([b])
    assert select_part([a, b], "discovery", 0, (1.0, 0.0, 0.0)) == [a, b]


def test_a_study_on_files_confirms_on_items_it_did_not_discover_on(tmp_path: Path) -> None:
    """`expertscope run -d a=FILE -d b=FILE`: the discovery, training and confirmation items are three
    disjoint parts of each file (checked on the items' hashes); a hand-made overlap is refused, or allowed
    and counted."""
    from expertscope import StudyConfig
    from expertscope.pipeline.prepare import _check_overlap, prepare

    fa, fb = _file(tmp_path / "a.jsonl"), _file(tmp_path / "b.jsonl", n=300)
    cfg = StudyConfig(domains=(f"a={fa}?task=classification", f"b={fb}?task=classification"), model="demo")
    inputs = prepare(cfg, ["profile", "steering"])
    for d in inputs.domains:
        disc = {item_hash(e) for e in d.examples}
        test = next(x for x in inputs.test if x.name == d.name)
        train = next(x for x in inputs.train if x.name == d.name)
        whole = load_domain(f"{d.name}={fa if d.name == 'a' else fb}", part="confirm")
        assert test.examples == whole.examples[:60]  # the steering stage's limit, from the confirmation part
        assert not disc & {item_hash(e) for e in test.examples} and not disc & {item_hash(e) for e in train.examples}
    assert inputs.overlap == {}
    items = inputs.items(("discovery", "confirm", "train"))
    assert items["discovery"]["a"]["n"] == len(inputs.domains[0]) and items["confirm"]["b"]["n"] == len(inputs.test[1])
    # a confirmation corpus that repeats discovery items: refused unless allowed, and counted
    inputs.test = [Domain("a", inputs.domains[0].examples[:3], "classification")]
    with pytest.raises(DataError, match=r"also discovery items.*--allow-overlap"):
        _check_overlap(inputs, allowed=False)
    assert _check_overlap(inputs, allowed=True) == {"a": 3}


def test_an_empty_part_is_one_line_naming_the_fix(tmp_path: Path) -> None:
    f = tmp_path / "one.jsonl"
    f.write_text(json.dumps({"text": "a lonely item"}))
    empty = next(p for p in ("discovery", "train", "confirm")
                 if part_of(item_hash(Example("a lonely item")), 0, (0.6, 0.2, 0.2)) != p)
    with pytest.raises(DataError, match=f"no {empty} items.*give the domain more items"):
        load_domain(f"a={f}", part=empty)
