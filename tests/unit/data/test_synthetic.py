"""The synthetic three-domain benchmark: determinism, disjoint splits, label correctness, the CLI."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
from typer.testing import CliRunner

from expertscope.cli.main import app
from expertscope.data import prompts, synthetic
from expertscope.data.types import Example
from expertscope.errors import ConfigError
from expertscope.evaluation.extract import extract_answer


@pytest.mark.parametrize("domain", synthetic.DOMAINS)
def test_generate_is_deterministic_and_prefix_stable(domain: str) -> None:
    synthetic._stream.cache_clear()
    short = synthetic.generate(domain, 20, seed=3, split="test")  # first: the 60 below continue its kept stream
    a = synthetic.generate(domain, 60, seed=3, split="test")
    fresh = synthetic._Stream(domain, "test", 3).take(60)  # the same 60 drawn in one go from a new RNG
    assert [e.to_dict() for e in a] == [e.to_dict() for e in fresh]
    assert [e.to_dict() for e in short] == [e.to_dict() for e in a][:20]
    a.examples.clear()  # a caller's list is its own: the kept stream is untouched
    assert [e.to_dict() for e in synthetic.generate(domain, 60, seed=3, split="test")] == [e.to_dict() for e in fresh]
    other = synthetic.generate(domain, 60, seed=4, split="test")
    assert [e.to_dict() for e in other] != [e.to_dict() for e in fresh]
    assert a.task == synthetic.DOMAIN_TASKS[domain] and a.name == domain
    assert len({e.id for e in fresh}) == 60  # ids are unique


@pytest.mark.parametrize("domain", synthetic.DOMAINS)
def test_splits_share_no_item_even_across_seeds(domain: str) -> None:
    keys = {}
    for split, seed in (("train", 0), ("validation", 1), ("test", 2)):
        dom = synthetic.generate(domain, 400, seed=seed, split=split)
        assert all(e.meta["split"] == split for e in dom)
        keys[split] = {e.meta["key"] for e in dom}
        assert all(synthetic.split_of(f"{domain}|{k}") == split for k in keys[split])
    assert not keys["train"] & keys["validation"]
    assert not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]
    # The rendered items differ too (not just the keys).
    train_texts = {(e.text, e.context) for e in synthetic.generate(domain, 400, seed=0, split="train")}
    test_items = synthetic.generate(domain, 400, seed=0, split="test")
    assert not train_texts & {(e.text, e.context) for e in test_items}


def test_splits_helper_sizes() -> None:
    out = synthetic.splits("math", {"train": 30, "validation": 10, "test": 12}, seed=0)
    assert {k: len(v) for k, v in out.items()} == {"train": 30, "validation": 10, "test": 12}


def _speakerless(line: str) -> str:
    """A dialogue line without its speaker name (names are cosmetic)."""
    return line.split(": ", 1)[1]


def test_emotion_splits_are_disjoint_by_an_independent_content_check() -> None:
    """No test dialogue's content (lines without speaker names) occurs in training, checked on the rendered
    text and an independent blake2b bucket, not through the generator's own key or split function."""
    import hashlib

    def content(ex: Example) -> tuple[str, ...]:
        return tuple(_speakerless(x) for x in (*(ex.context or ()), ex.text))

    train = {content(e) for e in synthetic.generate("emotion", 6000, seed=0, split="train")}
    test = synthetic.generate("emotion", 600, seed=0, split="test")
    assert not train & {content(e) for e in test}
    for ex in test:  # the documented rule: bucket = blake2b-64 of "emotion|<key>" mod 100, test is 85..99
        digest = hashlib.blake2b(f"emotion|{ex.meta['key']}".encode(), digest_size=8).digest()
        assert 85 <= int.from_bytes(digest, "big") % 100 < 100


def test_emotion_v2_is_imbalanced_multi_turn_and_uncertain() -> None:
    dom = synthetic.generate("emotion", 4000, seed=0, split="train")
    counts = Counter(e.label for e in dom)
    assert set(counts) == set(synthetic.EMOTION_LABELS) == set(prompts.LABELS)
    # Realistic imbalance: neutral is the most frequent label, the rarest emotion is several times rarer,
    # and the majority class alone is far from the accuracy band.
    assert counts.most_common(1)[0][0] == "neutral"
    assert 0.3 < counts["neutral"] / len(dom) < 0.45
    assert counts["neutral"] / min(counts.values()) > 4
    turns = Counter(len(e.context or ()) + 1 for e in dom)
    assert max(turns) >= 5 and sum(v for k, v in turns.items() if k >= 3) > 0.3 * len(dom)
    speakers = [re.match(r"^([A-Z][a-z]+): ", line) for e in dom for line in (*(e.context or ()), e.text)]
    assert all(speakers)
    # Annotators disagree: the declared label distributions cap any classifier's expected accuracy.
    bayes = sum(e.meta["label_probs"][e.meta["bayes_label"]] for e in dom) / len(dom)
    assert 0.65 < bayes < 0.85
    # The drawn labels follow the declared distributions (observed agreement with the mode, per rule).
    for rule in ("cue", "negated", "reaction", "sarcasm", "neutral"):
        items = [e for e in dom if e.meta["rule"] == rule]
        expected = sum(e.meta["label_probs"][e.meta["bayes_label"]] for e in items) / len(items)
        observed = sum(e.label == e.meta["bayes_label"] for e in items) / len(items)
        assert abs(observed - expected) < 4 * (expected * (1 - expected) / len(items)) ** 0.5 + 0.01, rule


def test_emotion_v2_label_depends_on_context() -> None:
    """The same last line carries different most-likely labels in different contexts (sarcasm, reactions),
    and negation flips a cue: no single last line decides the label."""
    dom = synthetic.generate("emotion", 4000, seed=0, split="train")
    by_line: dict[str, set[str]] = {}
    for e in dom:
        if e.meta["rule"] in ("sarcasm", "reaction"):
            by_line.setdefault(_speakerless(e.text), set()).add(e.meta["bayes_label"])
    assert by_line and all(len(v) >= 3 for v in by_line.values())
    sarcasm = [e for e in dom if e.meta["rule"] == "sarcasm"]
    bad = [e for e in sarcasm if e.meta["bayes_label"] in ("anger", "disgust", "sadness", "fear")]
    good = [e for e in sarcasm if e.meta["bayes_label"] == "joy"]
    assert bad and good  # the same praise reads as joy or as the bad event's emotion
    happy = [e for e in dom if re.search(r"\bnot (happy|glad|thrilled)", e.text)]
    assert happy and all(e.meta["bayes_label"] == "sadness" for e in happy)


def test_emotion_v1_is_kept_for_reproducing_the_first_demo() -> None:
    """The first demo's emotion data stays available (as "emotion_v1") and keeps its own split namespace."""
    v1 = synthetic.generate("emotion_v1", 50, seed=0, split="train")
    assert v1.name == "emotion" and all(e.id.startswith("emotion-train-") for e in v1)
    assert {e.meta["rule"] for e in v1} <= {"cue", "negated", "reaction", "neutral"}
    assert all(e.context is None or len(e.context) == 1 for e in v1)  # two-turn dialogues at most
    assert "emotion_v1" not in synthetic.DOMAINS


def test_knowledge_questions_are_consistent_and_learnable() -> None:
    facts = {(f.relation, f.entity): f for f in synthetic.knowledge_base()}
    assert len(facts) == 240 and len({f.subject for f in facts.values()}) == 4
    statements = " ".join(synthetic.knowledge_statements())
    train_keys = {e.meta["key"] for e in synthetic.generate("knowledge", 2000, seed=0, split="train")}
    for ex in synthetic.generate("knowledge", 200, seed=0, split="test"):
        relation, entity, _ = ex.meta["key"].split("|")
        fact = facts[(relation, entity)]
        assert ex.choices is not None and len(set(ex.choices)) == 4
        assert ex.choices["ABCD".index(ex.label)] == fact.value
        # Distractors come from the same relation (hence the same subject).
        same_relation = {f.value for f in facts.values() if f.relation == relation}
        assert set(ex.choices) <= same_relation
        assert fact.value in statements and entity in statements  # the fact is in the training text
        assert ex.meta["key"] not in train_keys  # but never this (fact, question form) pair
    open_train = synthetic.knowledge_open_questions("train")
    open_test = synthetic.knowledge_open_questions("test")
    assert open_train and open_test and not set(open_train) & set(open_test)


def test_math_solutions_are_correct() -> None:
    dom = synthetic.generate("math", 500, seed=0, split="train")
    n_ops = Counter(e.meta["n_ops"] for e in dom)
    assert set(n_ops) == {1, 2, 3}
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}
    for ex in dom:
        assert ex.solution is not None and ex.solution.endswith(f"#### {ex.answer}")
        assert extract_answer(ex.solution) == ex.answer
        steps = re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)\.", ex.solution)
        assert len(steps) == ex.meta["n_ops"]
        for a, op, b, c in steps:
            assert ops[op](int(a), int(b)) == int(c)
        assert int(steps[-1][3]) == int(ex.answer) and 0 <= int(ex.answer) <= 99


def test_bad_arguments_raise_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown synthetic domain"):
        synthetic.generate("poetry", 3)
    with pytest.raises(ConfigError, match="unknown split"):
        synthetic.generate("math", 3, split="dev")


def test_cli_data_synth_writes_jsonl_and_manifest(tmp_path) -> None:
    out = tmp_path / "synth"
    result = CliRunner().invoke(
        app, ["data", "synth", "--out", str(out), "--n-train", "5", "--n-validation", "3", "--n-test", "4"]
    )
    assert result.exit_code == 0, result.output
    for domain in synthetic.DOMAINS:
        for split, n in (("train", 5), ("validation", 3), ("test", 4)):
            rows = [json.loads(line) for line in (out / f"{domain}.{split}.jsonl").read_text().splitlines()]
            assert len(rows) == n
            exs = [Example.from_dict(r) for r in rows]
            assert [e.to_dict() for e in exs] == [
                e.to_dict() for e in synthetic.generate(domain, n, seed=0, split=split)
            ]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "synthetic-data" and len(manifest["files"]) == 9
    again = CliRunner().invoke(app, ["data", "synth", "--out", str(out)])
    assert again.exit_code == 2  # refuses to overwrite without --force


@pytest.mark.parametrize("domain", synthetic.DOMAINS)
def test_the_shifted_corpus_is_test_bucket_content_in_new_words(domain: str) -> None:
    """``@shifted``: items whose content keys are in the test bucket (checked by an independent blake2b), so never
    a validation or training item, reworded so that no text equals any validation, training or test text, with
    labels and answers that still hold."""
    import hashlib

    shifted = synthetic.generate(domain, 80, seed=0, split="shifted")
    assert len(shifted) == 80 and all(e.meta["split"] == "shifted" for e in shifted)
    for ex in shifted:
        bucket = int.from_bytes(hashlib.blake2b(f"{domain}|{ex.meta['key']}".encode(), digest_size=8).digest(), "big")
        assert 85 <= bucket % 100 < 100
    texts = {(e.text, e.context) for s in ("train", "validation", "test")
             for e in synthetic.generate(domain, 300 if s != "train" else 2000, seed=0, split=s)}
    assert not texts & {(e.text, e.context) for e in shifted}
    words = " ".join(e.text + " " + " ".join(e.context or ()) for e in shifted)
    if domain == "math":
        assert not any(re.search(rf"\b{w}\b", words) for w in (*synthetic._PEOPLE, *synthetic._OBJECTS))
        for ex in shifted:  # the worked solution still computes the answer, from the numbers the text states
            assert ex.solution.endswith(f"#### {ex.answer}") and extract_answer(ex.solution) == ex.answer
            start = re.match(r"\w+ has (\d+) ", ex.text)
            assert start is not None and ex.solution.startswith(start.group(1))
    elif domain == "emotion":
        assert not any(re.search(rf"\b{w}:", words) for w in synthetic._V2_SPEAKERS)
        assert {e.label for e in shifted} <= set(synthetic.EMOTION_LABELS)
    else:
        assert all(e.text.startswith("Quiz item: ") and e.label in "ABCD" for e in shifted)
    with pytest.raises(ConfigError, match="unknown split"):
        synthetic.generate(domain, 3, split="heldout")
