"""Evaluation: metrics against scikit-learn, answer extraction, scoring against naive loops, batch-size
invariance on a tiny random Mixtral, bad input, and the ``expertscope eval`` command."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from expertscope.cli.main import app
from expertscope.data import synthetic
from expertscope.data.types import Example
from expertscope.demo.train import train_tokenizer
from expertscope.errors import ConfigError, DataError
from expertscope.evaluation import (
    LABELS,
    accuracy,
    answers_equal,
    evaluate,
    extract_answer,
    prompt,
    target,
    weighted_f1,
    wilson_interval,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("seed", range(6))
def test_metrics_match_sklearn(seed: int) -> None:
    from sklearn.metrics import accuracy_score, f1_score  # here, not at collection: it costs every test process 1.7 s

    rng = random.Random(seed)
    n = rng.randint(1, 60)
    gold_labels = LABELS[: rng.randint(2, 7)]
    y_true = [rng.choice(gold_labels) for _ in range(n)]
    # Predictions may include labels that never occur in y_true.
    y_pred = [t if rng.random() < 0.5 else rng.choice(LABELS) for t in y_true]
    assert accuracy(y_true, y_pred) == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-12)
    expected = f1_score(y_true, y_pred, average="weighted", zero_division=0)
    assert weighted_f1(y_true, y_pred) == pytest.approx(expected, abs=1e-12)


def test_wilson_interval_known_values() -> None:
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-4)
    lo, hi = wilson_interval(50, 50)
    assert hi == 1.0 and lo == pytest.approx(0.9287, abs=1e-4)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


# ---------------------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5 + 3 = 8. #### 8", "8"),
        ("#### 42", "42"),
        ("####42", "42"),
        ("The total is 1,234 apples.", "1234"),
        ("she owes #### -7", "-7"),
        ("#### 3.50", "3.5"),
        ("#### $1,000,000", "1000000"),
        ("10-3 = 7", "7"),  # a subtraction, not the number -3
        ("x = -5 so the answer is -5", "-5"),
        ("#### 12 apples, then 13 more", "12"),  # the number after #### wins over the last number
        ("5 + 3 = 8. ####", "8"),  # empty marker: fall back to the last number
        ("5 + 3 = 8. #### eight", "8"),
        ("2 + 2 = 4. 4 * 3 = 12.", "12"),
        ("no numbers here", None),
        ("####", None),
        ("", None),
        (None, None),
        ("version v2 of the model", None),  # digits inside a word are not a number
        ("#### 8.0", "8"),
    ],
)
def test_extract_answer(text: str | None, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_answers_equal() -> None:
    assert answers_equal("8.0", "8") and answers_equal("1,000", "1000") and answers_equal("-0", "0")
    assert not answers_equal(None, "8") and not answers_equal("8", "9") and not answers_equal("abc", "abc")


# ------------------------------------------------------------------------------------- tiny model


def _build_pair(vocab_size: int):
    """A byte-level BPE tokenizer trained (as the demo's) on a little synthetic text, and a tiny Mixtral."""
    from transformers import MixtralConfig, MixtralForCausalLM

    texts = []
    for name in synthetic.DOMAINS:
        dom = synthetic.generate(name, 150, seed=0, split="train")
        texts += [prompt(dom.task, e) + target(dom.task, e) for e in dom]
    tok = train_tokenizer(texts, vocab_size=vocab_size)
    torch.manual_seed(0)
    cfg = MixtralConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return MixtralForCausalLM(cfg).eval(), tok


@pytest.fixture(scope="module")
def pair():
    """Vocabulary 600: the letters " A"-" D" are single tokens, most emotion labels are several."""
    return _build_pair(600)


@pytest.fixture(scope="module")
def tiny(pair):
    return pair[0]


@pytest.fixture(scope="module")
def tokenizer(pair):
    return pair[1]


def _examples(domain: str, n: int) -> list[Example]:
    return synthetic.generate(domain, n, seed=0, split="test").examples


def _naive_logprob(model, ids: list[int], start: int) -> float:
    """log p(ids[start:] | ids[:start]) from one unpadded forward pass, token by token."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(float(logp[t - 1, ids[t]]) for t in range(start, len(ids)))


def test_classification_scores_match_naive_loop(tiny, tokenizer) -> None:
    from sklearn.metrics import accuracy_score, f1_score

    exs = _examples("emotion", 10)
    res = evaluate(tiny, "classification", exs, tokenizer=tokenizer, batch_size=4)
    assert res.n == 10 and res.task == "classification"
    for ex, rec in zip(exs, res.predictions, strict=True):
        p_ids = tokenizer(prompt("classification", ex))["input_ids"]
        naive = {}
        for lab in LABELS:
            l_ids = tokenizer(" " + lab, add_special_tokens=False)["input_ids"]
            naive[lab] = _naive_logprob(tiny, p_ids + l_ids, len(p_ids))
            assert rec["scores"][lab] == pytest.approx(naive[lab], abs=1e-4)
        assert rec["prediction"] == max(naive, key=naive.get)
    gold, pred = [r["gold"] for r in res.predictions], [r["prediction"] for r in res.predictions]
    assert res.accuracy == pytest.approx(accuracy_score(gold, pred))
    assert res.weighted_f1 == pytest.approx(f1_score(gold, pred, average="weighted", zero_division=0))
    k = sum(r["correct"] for r in res.predictions)
    assert (res.ci_low, res.ci_high) == pytest.approx(wilson_interval(k, 10))


@pytest.mark.parametrize("vocab_size", [600, 300])
def test_multiple_choice_scores_match_naive_loop(pair, vocab_size: int) -> None:
    """Letters scored at the answer position; a tokenizer that splits " A" in two gets both tokens summed."""
    tiny, tokenizer = pair if vocab_size == 600 else _build_pair(vocab_size)
    n_tokens = 1 if vocab_size == 600 else 2
    assert all(len(tokenizer(" " + x, add_special_tokens=False)["input_ids"]) == n_tokens for x in "ABCD")
    exs = _examples("knowledge", 8)
    res = evaluate(tiny, "multiple_choice", exs, tokenizer=tokenizer, batch_size=3)
    for ex, rec in zip(exs, res.predictions, strict=True):
        p_ids = tokenizer(prompt("multiple_choice", ex))["input_ids"]
        for letter in "ABCD":
            l_ids = tokenizer(" " + letter, add_special_tokens=False)["input_ids"]
            naive = _naive_logprob(tiny, p_ids + l_ids, len(p_ids))
            assert rec["scores"][letter] == pytest.approx(naive, abs=1e-4)
        assert rec["prediction"] == max(rec["scores"], key=rec["scores"].get)


def test_math_generation_matches_naive_greedy_loop(tiny, tokenizer) -> None:
    exs = _examples("math", 3)
    res = evaluate(tiny, "math", exs, tokenizer=tokenizer, batch_size=3, max_new_tokens=12)
    for ex, rec in zip(exs, res.predictions, strict=True):
        ids = tokenizer(prompt("math", ex))["input_ids"]
        new: list[int] = []
        with torch.no_grad():
            for _ in range(12):  # greedy decoding without cache or padding
                nxt = int(tiny(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
                if nxt == tokenizer.eos_token_id:
                    break
                new.append(nxt)
        text = tokenizer.decode(new, skip_special_tokens=True)
        assert rec["generation"] == text.split("\n\n")[0].split("\nQuestion:")[0].split("\nDialogue:")[0]
        assert rec["prediction"] == extract_answer(rec["generation"])
        assert rec["correct"] == answers_equal(rec["prediction"], ex.answer)


@pytest.mark.parametrize(
    ("domain", "task"), [("emotion", "classification"), ("knowledge", "multiple_choice"), ("math", "math")]
)
def test_batch_size_does_not_change_scores(tiny, tokenizer, domain: str, task: str) -> None:
    exs = _examples(domain, 12)
    # Vary lengths within a batch so padding really happens.
    r1 = evaluate(tiny, task, exs, tokenizer=tokenizer, batch_size=1, max_new_tokens=16)
    r8 = evaluate(tiny, task, exs, tokenizer=tokenizer, batch_size=8, max_new_tokens=16)
    assert len({len(tokenizer(prompt(task, e))["input_ids"]) for e in exs}) > 1
    assert (r1.accuracy, r1.ci_low, r1.ci_high, r1.weighted_f1) == (
        r8.accuracy,
        r8.ci_low,
        r8.ci_high,
        r8.weighted_f1,
    )
    for a, b in zip(r1.predictions, r8.predictions, strict=True):
        assert a["prediction"] == b["prediction"]
        if "scores" in a:
            for key in a["scores"]:
                assert a["scores"][key] == pytest.approx(b["scores"][key], abs=1e-5)
        else:
            assert a["generation"] == b["generation"]


def test_accepts_loaded_model_object(tiny, tokenizer) -> None:
    class Loaded:
        model = tiny

    Loaded.tokenizer = tokenizer
    exs = _examples("knowledge", 4)
    a = evaluate(Loaded(), "multiple_choice", exs)
    b = evaluate(tiny, "multiple_choice", exs, tokenizer=tokenizer)
    assert [r["scores"] for r in a.predictions] == [r["scores"] for r in b.predictions]
    with pytest.raises(ConfigError, match="no tokenizer"):
        evaluate(tiny, "multiple_choice", exs)


def test_bad_input_raises_one_line_errors(tiny, tokenizer) -> None:
    cases = [
        ("summarisation", [Example(text="x", label="joy")], ConfigError, "unknown task"),
        ("classification", [Example(text="x")], DataError, "no 'label'"),
        ("classification", [Example(text="x", label="happy")], DataError, "outside the task's label set"),
        (
            "multiple_choice",
            [Example(text="q", label="E", choices=("a", "b", "c", "d"))],
            DataError,
            "letters",
        ),
        ("multiple_choice", [Example(text="q", label="A")], DataError, "choices"),
        ("math", [Example(text="q")], DataError, "no 'answer'"),
        ("math", [Example(text="q", answer="many")], DataError, "non-numeric"),
        ("math", [], DataError, "no examples"),
    ]
    for task, exs, err, match in cases:
        with pytest.raises(err, match=match) as info:
            evaluate(tiny, task, exs, tokenizer=tokenizer)
        assert "\n" not in str(info.value) and ": " in str(info.value)


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def tiny_dir(tiny, tokenizer, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-model")
    tiny.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _cli_scores(model_dir: Path, out: Path, batch_size: int) -> dict:
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--model",
            str(model_dir),
            "--limit",
            "8",
            "--batch-size",
            str(batch_size),
            "--max-new-tokens",
            "12",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and "emotion" in result.output
    scores = json.loads((out / "results.json").read_text())
    preds = {n: (out / f"predictions.{n}.jsonl").read_text() for n in synthetic.DOMAINS}
    return {"scores": scores, "preds": preds}


def test_cli_eval_tiny_model_same_at_batch_1_and_8(tiny_dir: Path, tmp_path: Path) -> None:
    one = _cli_scores(tiny_dir, tmp_path / "b1", 1)
    eight = _cli_scores(tiny_dir, tmp_path / "b8", 8)
    assert one["scores"] == eight["scores"]
    assert set(one["scores"]) == set(synthetic.DOMAINS)
    for name in synthetic.DOMAINS:
        p1 = [json.loads(x)["prediction"] for x in one["preds"][name].splitlines()]
        p8 = [json.loads(x)["prediction"] for x in eight["preds"][name].splitlines()]
        assert p1 == p8


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    ("rows", "extra", "message"),
    [
        ([{"text": "Ann: hi", "label": "joy"}], ["--task", "sentiment"], "unknown task"),
        ([{"text": "Ann: hi"}], ["--task", "classification"], "no 'label'"),
        ([{"text": "Ann: hi", "label": "happy"}], ["--task", "classification"], "has one label"),
        ([{"text": "2+2?"}], ["--task", "math"], "no 'answer'"),
        ([{"nottext": 1}], [], "has no field 'text'"),
    ],
)
def test_cli_eval_bad_input_exit_2(tiny_dir: Path, tmp_path: Path, rows, extra, message) -> None:
    data = _write_jsonl(tmp_path / "bad.jsonl", rows)
    result = CliRunner().invoke(app, ["eval", "--model", str(tiny_dir), "--data", str(data), *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_cli_eval_data_file(tiny_dir: Path, tmp_path: Path) -> None:
    exs = _examples("knowledge", 5)
    data = _write_jsonl(tmp_path / "mc.jsonl", [e.to_dict() for e in exs])
    result = CliRunner().invoke(
        app, ["eval", "--model", str(tiny_dir), "--data", str(data), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 0, result.output
    res = json.loads((tmp_path / "o" / "results.json").read_text())["mc"]
    assert res["task"] == "multiple_choice" and res["n"] == 5


# ----------------------------------------------------------------------- fast path against the reference


def _same(fast, ref, math_task: bool = False) -> None:
    """Equal predictions, correctness, accuracy, CI and F1; scores equal up to float reduction order."""
    assert [r["prediction"] for r in fast.predictions] == [r["prediction"] for r in ref.predictions]
    assert [r["correct"] for r in fast.predictions] == [r["correct"] for r in ref.predictions]
    assert (fast.n, fast.accuracy, fast.ci_low, fast.ci_high, fast.weighted_f1) == (
        ref.n, ref.accuracy, ref.ci_low, ref.ci_high, ref.weighted_f1)
    for a, b in zip(fast.predictions, ref.predictions, strict=True):
        if "scores" in b:
            assert list(a["scores"]) == list(b["scores"])
            for key in b["scores"]:
                assert a["scores"][key] == pytest.approx(b["scores"][key], abs=2e-5)
        if math_task:  # a row stopped once its answer was settled: a prefix of the run to EOS
            assert b["generation"].startswith(a["generation"])


def _relabelled(exs: list[Example], labels: tuple[str, ...], seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    return [Example(text=e.text, context=e.context, label=rng.choice(labels), id=e.id) for e in exs]


@pytest.mark.parametrize("labels", [None, ("A", "B", "C", "D"), ("A", "joy", "B", "neutral", "sadness")])
def test_classification_fast_path_equals_reference(tiny, tokenizer, labels) -> None:
    """All-multi-token labels (the 7 emotions here), all one-token labels, and a mix."""
    from oracles.evaluation import evaluate_reference

    exs = _examples("emotion", 21)
    if labels is not None:
        exs = _relabelled(exs, labels)
        n_single = sum(len(tokenizer(" " + x, add_special_tokens=False)["input_ids"]) == 1 for x in labels)
        assert n_single >= 2  # the one-token path is exercised
    for bs in (1, 5, 16):
        fast = evaluate(tiny, "classification", exs, tokenizer=tokenizer, batch_size=bs, labels=labels)
        ref = evaluate_reference(tiny, "classification", exs, tokenizer=tokenizer, batch_size=bs, labels=labels)
        _same(fast, ref)
        assert fast.n_truncated == 0 and not any("truncated" in r for r in fast.predictions)


@pytest.mark.parametrize("vocab_size", [600, 300])
def test_multiple_choice_fast_path_equals_reference(pair, vocab_size: int) -> None:
    from oracles.evaluation import evaluate_reference

    tiny, tokenizer = pair if vocab_size == 600 else _build_pair(vocab_size)
    exs = _examples("knowledge", 13)
    fast = evaluate(tiny, "multiple_choice", exs, tokenizer=tokenizer, batch_size=4)
    _same(fast, evaluate_reference(tiny, "multiple_choice", exs, tokenizer=tokenizer, batch_size=4))


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe", "deepseek_v3"])
def test_fast_path_equals_reference_other_families(make_tiny, family: str) -> None:
    """Character-level tokenizer: every label and letter is several tokens (the ``prompt + label`` rows)."""
    from expertscope.testing import tiny_tokenizer
    from oracles.evaluation import evaluate_reference

    model, tok = make_tiny(family), tiny_tokenizer()
    short = [e for e in synthetic.generate("emotion", 60, seed=1, split="test").examples
             if len(prompt("classification", e)) < 150][:6]
    cases = [("classification", short), ("multiple_choice", _examples("knowledge", 6)),
             ("math", _examples("math", 4))]
    for task, exs in cases:
        fast = evaluate(model, task, exs, tokenizer=tok, batch_size=4, max_new_tokens=10)
        ref = evaluate_reference(model, task, exs, tokenizer=tok, batch_size=4, max_new_tokens=10)
        assert fast.n_truncated == 0
        _same(fast, ref, math_task=task == "math")


def test_math_fast_path_equals_reference(tiny, tokenizer) -> None:
    from oracles.evaluation import evaluate_reference

    exs = _examples("math", 10)
    fast = evaluate(tiny, "math", exs, tokenizer=tokenizer, batch_size=4, max_new_tokens=20)
    ref = evaluate_reference(tiny, "math", exs, tokenizer=tokenizer, batch_size=4, max_new_tokens=20)
    _same(fast, ref, math_task=True)


# ----------------------------------------------------------------------------------- answer_settled


def test_answer_settled_never_changes_the_extracted_answer() -> None:
    """On random texts, wherever a prefix is called settled, the final text's answer equals the prefix's:
    the independent check of the early stop (extract_answer on the cut text, as evaluate does)."""
    from expertscope.evaluation.evaluate import _cut, answer_settled

    pieces = ["####", "#", "###", " ", "\n", "\n\n", "1", "2", "0", ",", ".", "-", "12", ",000", ".5", "Question:",
              "Dialogue:", "\nQuest", "ion:", "a", "x", "é", "٣", "=", "$", "\ufffd"]
    rng = random.Random(0)
    settled = 0
    for _ in range(4000):
        parts = [rng.choice(pieces) for _ in range(rng.randint(1, 14))]
        full = "".join(parts)
        final = extract_answer(_cut(full))
        for k in range(1, len(parts) + 1):
            text = "".join(parts[:k])
            if answer_settled(text):
                settled += 1
                assert extract_answer(_cut(text)) == final, (text, full)
    assert settled > 1000  # the check is not vacuous


@pytest.mark.parametrize(
    ("text", "settled"),
    [(" 5 + 3 = 8. #### 8", False), (" 5 + 3 = 8. #### 8\n", True), (" #### 8.", False), (" #### 8,", False),
     (" #### 8 apples", False), (" #### 8a", True), ("#### 1,000\n", True), (" 8 = 8\n\n", True),
     (" 8 = 8\n", False), (" 8 = 8\n\nQuestion:", True), ("####\n\n", True), (" 7\n\n#### 8\n", True)],
)
def test_answer_settled_cases(text: str, settled: bool) -> None:
    from expertscope.evaluation.evaluate import STOP_SEQUENCES, answer_settled

    assert answer_settled(text) is settled
    assert all(s.startswith("\n") for s in STOP_SEQUENCES)  # answer_settled's shortcut relies on it


# ----------------------------------------------------------------------------------------- context


@pytest.fixture(scope="module")
def short_context(tokenizer):
    """The tiny Mixtral's weights with a 40-token context (the rotary model reads any position, so only
    the evaluation's own guard keeps prompts inside it)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=40, pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return MixtralForCausalLM(cfg).eval()


def _positions_seen(model) -> tuple[list[int], object]:
    """A hook on the rotary embedding recording the largest position id of every forward."""
    seen: list[int] = []

    def hook(_mod, args, kwargs):
        pos = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        seen.append(int(pos.max()))

    return seen, model.model.rotary_emb.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize(("domain", "task"), [("emotion", "classification"), ("knowledge", "multiple_choice"),
                                              ("math", "math")])
def test_prompts_are_cut_from_the_left_to_fit_the_context(short_context, tokenizer, domain, task) -> None:
    exs = _examples(domain, 8)
    new = 12
    seen, handle = _positions_seen(short_context)
    try:
        res = evaluate(short_context, task, exs, tokenizer=tokenizer, batch_size=3, max_new_tokens=new)
    finally:
        handle.remove()
    lens = [len(tokenizer(prompt(task, e))["input_ids"]) for e in exs]
    labels = [len(tokenizer(" " + x, add_special_tokens=False)["input_ids"]) for x in LABELS]
    room = {"classification": max(labels), "multiple_choice": 1, "math": new}[task]
    expected = [n > 40 - room for n in lens]
    assert any(expected) and res.n_truncated == sum(expected)
    assert [bool(r.get("truncated")) for r in res.predictions] == expected
    assert seen and max(seen) <= 39  # no forward ever used a position past the 40-token context
    # Independent check: the score of a cut prompt is the naive log-likelihood of BOS + its last tokens.
    if task != "math":
        for ex, rec, cut in zip(exs, res.predictions, expected, strict=True):
            p = tokenizer(prompt(task, ex))["input_ids"]
            if cut:
                p = p[:1] + p[len(p) - (40 - room - 1):]
                assert p[0] == tokenizer.bos_token_id and len(p) == 40 - room
            for key, score in rec["scores"].items():
                cont = tokenizer((" " + key), add_special_tokens=False)["input_ids"]
                assert score == pytest.approx(_naive_logprob(short_context, p + cont, len(p)), abs=1e-4)


def test_no_room_for_the_prompt_is_one_line(short_context, tokenizer) -> None:
    with pytest.raises(ConfigError, match="max-new-tokens") as info:
        evaluate(short_context, "math", _examples("math", 2), tokenizer=tokenizer, max_new_tokens=40)
    assert "\n" not in str(info.value)


def test_fit_to_context_keeps_bos() -> None:
    from expertscope.evaluation.evaluate import fit_to_context

    out, cut = fit_to_context([[1, 5, 6, 7, 8], [1, 5], [5, 6, 7, 8, 9]], 3, keep=[1])
    assert out == [[1, 7, 8], [1, 5], [7, 8, 9]] and cut == [True, False, True]
    assert fit_to_context([[1, 2, 3]], None) == ([[1, 2, 3]], [False])


def test_progress_callback(tiny, tokenizer) -> None:
    calls: list[tuple[str, int, int]] = []
    batches: list[int] = []
    evaluate(tiny, "multiple_choice", _examples("knowledge", 7), tokenizer=tokenizer, batch_size=3,
             progress=lambda *a: calls.append(a), on_batch=batches.append)
    assert calls == [("evaluating multiple_choice", d, 7) for d in (0, 3, 6, 7)]
    assert batches == [3, 3, 1]


def test_cli_eval_reports_truncation(short_context, tokenizer, tmp_path: Path) -> None:
    model_dir = tmp_path / "short"
    short_context.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    result = CliRunner().invoke(app, ["eval", "--model", str(model_dir), "--limit", "6", "--max-new-tokens", "8",
                                      "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert "cut from the left" in result.output and "40-token context" in result.output
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert res["emotion"]["n_truncated"] > 0
    assert json.dumps(manifest).count("n_truncated") >= 3


def test_steering_rows_count_truncated_items(short_context, tokenizer) -> None:
    """The intervention study carries each evaluation's left-truncation count (40-token context, long
    emotion dialogues): equal to what evaluate() counts for the same items, and not 0."""
    import pandas as pd

    from expertscope.data.sources import load_domain
    from expertscope.interventions.steering_study import intervention_study
    from expertscope.models.model import MoEModel

    moe = MoEModel.from_model(short_context, tokenizer=tokenizer)
    dom = load_domain("emo=synthetic:emotion@test", limit=6)
    table = pd.DataFrame({"domain": ["emo"], "layer": [0], "expert": [1], "is_domain_expert": [True],
                          "specificity": [0.2]})
    res = intervention_study(moe, [dom], table, None, n_boot=50, n_controls=1, dose_scales=(), dose_biases=(),
                             finetune=False, selectivity=False, batch_size=3)
    want = evaluate(moe, "classification", dom, batch_size=3).n_truncated
    t = res.table[res.table["applicable"].astype(bool)]
    assert want > 0 and set(t["n_truncated"]) == {want}


# ------------------------------------------------------------------------------------------- cost


class _Counted:
    """Counts the (rows, length) of every forward pass ``model`` runs (decoding steps included)."""

    def __init__(self, model) -> None:
        self.shapes: list[tuple[int, int]] = []
        self.handle = model.register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, _m, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.shapes.append(tuple(ids.shape))


@pytest.mark.parametrize("labels", [None, ("A", "joy", "B", "neutral", "sadness")])
@pytest.mark.parametrize("bs", [1, 5, 16])
def test_scoring_cost_counts_the_tokens_evaluation_runs(pair, labels, bs: int) -> None:
    """Classification (multi-token labels, and a mix with one-token labels) and multiple choice (one-token letters,
    and a tokenizer that splits them): the padded tokens of every forward evaluation runs, counted by a hook on
    the model, equal ``scoring_cost``'s; the largest forward is its largest."""
    from expertscope.evaluation import scoring_cost

    tiny, tokenizer = pair
    cases = [("classification", _relabelled(_examples("emotion", 11), labels) if labels else _examples("emotion", 11),
              tokenizer, tiny)]
    if labels is None:
        cases.append(("multiple_choice", _examples("knowledge", 7), tokenizer, tiny))
        cases.append(("multiple_choice", _examples("knowledge", 7), *reversed(_build_pair(300))))
    for task, exs, tok, model in cases:
        c = _Counted(model)
        try:
            evaluate(model, task, exs, tokenizer=tok, batch_size=bs, labels=labels)
        finally:
            c.handle.remove()
        cost = scoring_cost(task, exs, tok, batch_size=bs, labels=labels)
        assert cost.token_forwards == sum(r * n for r, n in c.shapes), (task, c.shapes)
        assert cost.forwards == len(c.shapes) and cost.largest == max(c.shapes, key=lambda x: x[0] * x[1])
        assert cost.items == len(exs)
    # the full label set is scored whatever the examples' labels: two items of the seven emotions cost seven rows
    two = _examples("emotion", 2)
    assert len({e.label for e in two}) < len(LABELS)
    seven = scoring_cost("classification", two, tokenizer, batch_size=16)
    n_multi = sum(len(tokenizer(" " + x, add_special_tokens=False)["input_ids"]) > 1 for x in LABELS)
    assert seven.largest[0] == 2 * n_multi


def test_scoring_cost_of_math_counts_prompt_and_decoding_steps(tokenizer) -> None:
    from expertscope.evaluation import scoring_cost
    from expertscope.evaluation.evaluate import DECODE_STEP_SHARE

    exs = _examples("math", 5)
    lens = sorted((len(tokenizer(prompt("math", e))["input_ids"]) for e in exs), reverse=True)
    c = scoring_cost("math", exs, tokenizer, batch_size=3, max_new_tokens=10)
    by_hand = 3 * lens[0] + 2 * lens[3] + 10 * (3 * max(1, DECODE_STEP_SHARE * lens[0]) +
                                               2 * max(1, DECODE_STEP_SHARE * lens[3]))
    assert c.token_forwards == pytest.approx(by_hand) and c.forwards == 2
    with pytest.raises(ConfigError, match="unknown task"):
        scoring_cost("poetry", exs, tokenizer)
