"""The misuse probe: bad input through the CLI and the API must fail with one line, exit code 2, nothing
half-written and nothing outside --out; and the data-loss cases (a forced run over a finished one, lm-eval
over earlier results, two writers in one directory, resume with other settings) must be impossible."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import expertscope as es
from expertscope.cli.main import app
from expertscope.config import StudyConfig
from expertscope.errors import ExpertscopeError, InputTypeError, OutputError
from expertscope.execution import make_executor
from expertscope.pipeline import PIPELINE
from expertscope.testing import tiny_model, tiny_tokenizer

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A tiny model, broken copies of it, and data files good and bad (outside every test's work dir)."""
    d = tmp_path_factory.mktemp("probe-inputs")
    model = d / "model"
    tiny_model("mixtral", num_local_experts=4).save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    weights = next(model.glob("*.safetensors")).read_bytes()

    def copy_model(name: str, weights_bytes: bytes | None, tokenizer: bool = True) -> Path:
        m = d / name
        m.mkdir()
        for f in model.iterdir():
            if f.suffix == ".safetensors":
                (m / f.name).write_bytes(weights_bytes if weights_bytes is not None else f.read_bytes())
            elif tokenizer or not f.name.startswith(("tokenizer", "special_tokens")):
                (m / f.name).write_bytes(f.read_bytes())
        return m

    files = {
        "model": model,
        "truncated": copy_model("truncated", weights[: len(weights) // 2]),
        "garbage": copy_model("garbage", b"not a safetensors file at all" * 4),
        "no_tokenizer": copy_model("no_tokenizer", None, tokenizer=False),
    }
    texts = [{"text": f"sentence number {i} about things"} for i in range(6)]
    files["good"] = d / "good.jsonl"
    files["good"].write_text("\n".join(json.dumps(r) for r in texts) + "\n")
    files["bom"] = d / "bom.jsonl"
    files["bom"].write_bytes(b"\xef\xbb\xbf" + files["good"].read_bytes())
    for name, row in (("row_int", 42), ("row_str", "s"), ("row_list", [1, 2])):
        files[name] = d / f"{name}.jsonl"
        files[name].write_text(json.dumps(texts[0]) + "\n" + json.dumps(row) + "\n")
    files["text_dict"] = d / "text_dict.jsonl"
    files["text_dict"].write_text(json.dumps({"text": {"a": 1}}) + "\n")
    files["text_num"] = d / "text_num.jsonl"
    files["text_num"].write_text(json.dumps({"text": 3.5}) + "\n")
    files["latin1"] = d / "latin1.jsonl"
    files["latin1"].write_bytes(json.dumps({"text": "café"}, ensure_ascii=False).encode("latin-1") + b"\n")
    files["utf16"] = d / "utf16.jsonl"
    files["utf16"].write_bytes(json.dumps({"text": "hello"}).encode("utf-16"))
    files["json_str"] = d / "str.json"
    files["json_str"].write_text(json.dumps("just a string"))
    files["badjson"] = d / "bad.jsonl"
    files["badjson"].write_text('{"text": "a"\n')
    files["eval_rows"] = d / "eval_rows.jsonl"
    files["eval_rows"].write_text(json.dumps({"text": "q", "label": "joy"}) + "\n42\n")
    files["afile"] = d / "a-file"
    files["afile"].write_text("x")
    import numpy as np

    np.save(d / "routes_npy.npy", np.zeros((5, 2, 2), dtype=np.int64))
    np.save(d / "routes_bool.npy", np.zeros((5, 2, 2), dtype=bool))
    files["routes_npy"], files["routes_bool"] = d / "routes_npy.npy", d / "routes_bool.npy"
    for name, obj in (("steer_list", [[0, 1]]), ("steer_shape", {"targets": [[1]], "scale": 1.2}),
                      ("steer_scale", {"targets": [[0, 1]], "scale": "big"}),
                      ("steer_key", {"targets": [[0, 1]], "scales": 2})):
        files[name] = d / f"{name}.json"
        files[name].write_text(json.dumps(obj))
    files["steer_bad"] = d / "steer_bad.json"
    files["steer_bad"].write_text("{targets: [[0, 1]]")
    files.update(_corrupt_inputs(d, model, weights))
    files["bad_table_run"] = d / "bad_table_run"
    files["bad_table_run"].mkdir()
    (files["bad_table_run"] / "manifest.json").write_text(json.dumps({"kind": "study", "status": "complete"}))
    (files["bad_table_run"] / "domain_experts.parquet").write_bytes(b"PAR1 truncated")
    return files


def _corrupt_inputs(d: Path, model: Path, weights: bytes) -> dict[str, Path]:
    """Corrupt and absurd inputs of issue 22 (#4) and the probe's own: surrogates, broken profiles and models,
    odd steering files, odd data files."""
    from safetensors.numpy import load_file, save_file

    files: dict[str, Path] = {}

    def write(name: str, text: str | bytes) -> Path:
        files[name] = d / name
        if isinstance(text, bytes):
            files[name].write_bytes(text)
        else:
            files[name].write_text(text, encoding="utf-8")
        return files[name]

    # A lone surrogate: JSON's "\ud800" escape without its pair (json.dumps writes it so).
    write("surrogate.jsonl", json.dumps({"text": "hello \ud800 world", "label": "joy"}) + "\n")
    write("surrogate_label.jsonl", json.dumps({"text": "hello", "label": "jo\udfffy"}) + "\n")
    write("label_list.jsonl", json.dumps({"text": "x", "label": ["joy"]}) + "\n")
    write("answer_dict.jsonl", json.dumps({"text": "x", "answer": {"n": 4}}) + "\n")
    write("empty.jsonl", "")
    write("blank_lines.jsonl", "\n  \n\n")
    write("blank_text.jsonl", json.dumps({"text": "   "}) + "\n")
    files["dangling.jsonl"] = d / "dangling.jsonl"
    files["dangling.jsonl"].symlink_to(d / "no-such-target.jsonl")
    for name, body in (("st_huge.json", '{"targets": [[0, 1]], "scale": 1e308}'),
                       ("st_nan.json", '{"targets": [[0, 1]], "scale": NaN}'),
                       ("st_inf.json", '{"targets": [[0, 1]], "scale": 1e999}'),
                       ("st_bool.json", '{"targets": [[0, 1]], "scale": true}'),
                       ("st_dict.json", '{"targets": {"0": 1}}'),
                       ("st_triple.json", '{"targets": [[0, 1, 2]]}'),
                       ("st_negative.json", '{"targets": [[0, -1]]}'),
                       ("st_empty.json", "")):
        write(name, body)
    # A model whose config asks for 8 experts where the weights hold 4, and one whose lm_head is gone.
    for name in ("mismatch", "missing", "extra"):
        m = d / name
        m.mkdir()
        for f in model.iterdir():
            if f.suffix != ".safetensors":
                (m / f.name).write_bytes(f.read_bytes())
        files[name] = m
    tiny_model("mixtral", num_local_experts=8).config.save_pretrained(files["mismatch"])
    (files["mismatch"] / "model.safetensors").write_bytes(weights)
    arrays = load_file(str(next(model.glob("*.safetensors"))))
    save_file({k: v for k, v in arrays.items() if k != "lm_head.weight"}, str(files["missing"] / "model.safetensors"),
              metadata={"format": "pt"})
    save_file({**arrays, "extra.weight": arrays["lm_head.weight"]}, str(files["extra"] / "model.safetensors"),
              metadata={"format": "pt"})
    # A finished profile run, and copies whose profile.safetensors is truncated, garbage, foreign or a directory.
    run = d / "profile_run"
    texts = "\n".join(json.dumps({"text": f"text number {i}"}) for i in range(4)) + "\n"
    write("texts.jsonl", texts)
    r = runner.invoke(app, ["profile", "-m", str(model), "-d", f"a={files['texts.jsonl']}", "-d",
                            "b=synthetic:math?limit=4", "-o", str(run)])
    assert r.exit_code == 0, r.output
    files["profile_run"] = run
    good = (run / "profile.safetensors").read_bytes()
    for name, body in (("trunc_run", good[: len(good) // 2]), ("garbage_run", b"\x00garbage" * 9),
                       ("foreign_run", weights), ("dir_run", None)):
        files[name] = d / name
        files[name].mkdir()
        for f in run.iterdir():
            if f.is_file():
                (files[name] / f.name).write_bytes(f.read_bytes())
        (files[name] / "profile.safetensors").unlink()
        if body is None:
            (files[name] / "profile.safetensors").mkdir()
        else:
            (files[name] / "profile.safetensors").write_bytes(body)
    return {k.removesuffix(".jsonl").removesuffix(".json"): v for k, v in files.items()}


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.lstat().st_size for p in sorted(root.rglob("*"))}


def _profile(*extra: str) -> list[str]:
    return ["profile", "--model", "{model}", "-d", "a={good}", "-d", "b=synthetic:math", *extra]


M, G = "{model}", "{good}"
# (id, argv with {placeholders} for inputs and {out} for the output directory, text the one line must contain)
CLI_CASES: list[tuple[str, list[str], str]] = [
    ("limit-0", _profile("--limit", "0", "-o", "{out}"), "--limit 0 is out of range"),
    ("limit-negative", _profile("--limit", "-2", "-o", "{out}"), "--limit -2 is out of range"),
    ("batch-0", _profile("--batch-size", "0", "-o", "{out}"), "--batch-size 0"),
    ("max-length-0", _profile("--max-length", "0", "-o", "{out}"), "--max-length 0"),
    ("device-potato", _profile("--device", "potato", "-o", "{out}"), "unknown device 'potato'"),
    ("device-cuda7", _profile("--device", "cuda:7", "-o", "{out}"), "cuda:7"),
    ("out-is-file", _profile("-o", "{afile}"), "is a file"),
    ("out-under-file", _profile("-o", "{afile}/sub"), "is a file"),
    ("query-limit-abc", ["profile", "-m", M, "-d", "a={good}?limit=abc", "-o", "{out}"], "not a whole number"),
    ("query-limit-0", ["profile", "-m", M, "-d", "a={good}?limit=0", "-o", "{out}"], "out of range"),
    ("query-task", ["profile", "-m", M, "-d", "a={good}?task=poetry", "-o", "{out}"], "unknown task 'poetry'"),
    ("row-int", ["profile", "-m", M, "-d", "a={row_int}", "-o", "{out}"], "not an object"),
    ("row-str", ["profile", "-m", M, "-d", "a={row_str}", "-o", "{out}"], "not an object"),
    ("row-list", ["profile", "-m", M, "-d", "a={row_list}", "-o", "{out}"], "not an object"),
    ("text-dict", ["profile", "-m", M, "-d", "a={text_dict}", "-o", "{out}"], "is a dict"),
    ("text-number", ["profile", "-m", M, "-d", "a={text_num}", "-o", "{out}"], "is a float"),
    ("latin1", ["profile", "-m", M, "-d", "a={latin1}", "-o", "{out}"], "save it as UTF-8"),
    ("utf16", ["profile", "-m", M, "-d", "a={utf16}", "-o", "{out}"], "UTF-16"),
    ("json-string", ["profile", "-m", M, "-d", "a={json_str}", "-o", "{out}"], "holds a JSON str"),
    ("bad-jsonl", ["profile", "-m", M, "-d", "a={badjson}", "-o", "{out}"], "not valid JSON"),
    ("domain-dir", ["profile", "-m", M, "-d", "a={bad_table_run}", "-o", "{out}"], "is a directory"),
    ("synthetic-poetry", ["profile", "-m", M, "-d", "a=synthetic:poetry", "-o", "{out}"], "synthetic domain"),
    ("dup-domain", ["profile", "-m", M, "-d", "a={good}", "-d", "a=synthetic:math", "-o", "{out}"], "used twice"),
    ("truncated-weights", _profile("-o", "{out}", "--model", "{truncated}"), "corrupt or truncated"),
    ("garbage-weights", _profile("-o", "{out}", "--model", "{garbage}"), "corrupt or truncated"),
    ("no-tokenizer", _profile("-o", "{out}", "--model", "{no_tokenizer}"), "tokenizer.save_pretrained(dir))"),
    ("offline-hub", _profile("-o", "{out}", "--model", "someorg/some-moe"), "cannot fetch"),
    ("drivers-z-nan", ["drivers", "-m", M, "-d", "a={good}", "--z", "nan", "-o", "{out}"], "--z nan is not finite"),
    ("drivers-z-inf", ["drivers", "-m", M, "-d", "a={good}", "--z", "inf", "-o", "{out}"], "not finite"),
    ("drivers-magnitude-nan", ["drivers", "-m", M, "-d", "a={good}", "--magnitude", "nan", "-o", "{out}"],
     "--magnitude nan"),
    ("drivers-limit-0", ["drivers", "-m", M, "-d", "a={good}", "--limit", "0", "-o", "{out}"], "--limit 0"),
    ("drivers-layers", ["drivers", "-m", M, "-d", "a={good}", "--layers", "x", "-o", "{out}"], "--layers"),
    ("run-limit-0", ["run", "-m", M, "--limit", "0", "-o", "{out}"], "--limit 0"),
    ("run-causal-limit", ["run", "-m", M, "--causal-limit", "-3", "-o", "{out}"], "--causal-limit -3"),
    ("run-z-nan", ["run", "-m", M, "--z", "nan", "-o", "{out}"], "--z nan"),
    ("run-device", ["run", "-m", M, "--device", "potato", "-o", "{out}"], "unknown device"),
    ("run-missing-domain-file", ["run", "-m", M, "-d", "a=/no/such.jsonl", "-o", "{out}"], "not found"),
    ("run-one-domain", ["run", "-m", M, "-d", "a=synthetic:math", "-o", "{out}"], "pass at least two"),
    ("run-no-task", ["run", "-m", M, "-d", "a={good}", "-d", "b={good}", "-o", "{out}"], "?task="),
    ("steer-no-task", ["steer-study", "-m", M, "-d", "a={good}", "-d", "b={good}", "-o", "{out}"], "?task="),
    ("run-model-missing", ["run", "-m", "./no-such-model", "-o", "{out}"], "does not exist"),
    ("steer-up-nan", ["steer-study", "-m", M, "--scale-up", "nan", "-o", "{out}"], "--scale-up nan"),
    ("steer-down-inf", ["steer-study", "-m", M, "--scale-down", "inf", "-o", "{out}"], "--scale-down inf"),
    ("steer-up-negative", ["steer-study", "-m", M, "--scale-up", "-1", "-o", "{out}"], "not positive"),
    ("domains-alpha", ["domains", "{bad_table_run}", "--alpha", "1.5"], "--alpha 1.5 is not in (0, 1)"),
    ("domains-z-nan", ["domains", "{bad_table_run}", "--z", "nan"], "--z nan"),
    ("eval-row-int", ["eval", "--model", M, "--data", "{eval_rows}", "--out", "{out}"],
     "not an object"),
    ("eval-latin1", ["eval", "--model", M, "--data", "{latin1}", "--out", "{out}"], "UTF-8"),
    ("eval-limit-0", ["eval", "--model", M, "--limit", "0", "--out", "{out}"], "--limit 0"),
    ("eval-device", ["eval", "--model", M, "--device", "potato", "--out", "{out}"], "unknown device"),
    ("lm-eval-steer-json", ["lm-eval", "-m", M, "--steer", "{steer_bad}", "-o", "{out}"], "not valid JSON"),
    ("lm-eval-steer-list", ["lm-eval", "-m", M, "--steer", "{steer_list}", "-o", "{out}"], "holds a JSON list"),
    ("lm-eval-steer-shape", ["lm-eval", "-m", M, "--steer", "{steer_shape}", "-o", "{out}"], "[layer, expert]"),
    ("lm-eval-steer-scale", ["lm-eval", "-m", M, "--steer", "{steer_scale}", "-o", "{out}"], "not a number"),
    ("lm-eval-steer-key", ["lm-eval", "-m", M, "--steer", "{steer_key}", "-o", "{out}"], "unknown key 'scales'"),
    ("lm-eval-limit-0", ["lm-eval", "-m", M, "--limit", "0", "-o", "{out}"], "--limit 0"),
    ("report-out-dir", ["report", "{bad_table_run}", "-o", "{inputs}"], "is a directory"),
    ("report-no-manifest", ["report", "{inputs}"], "no manifest.json"),
    ("report-bad-table", ["report", "{bad_table_run}"], "domain_experts.parquet cannot be read"),
    ("synth-domain", ["data", "synth", "--out", "{out}", "--domains", "poetry"], "unknown domain"),
    ("demo-scale-nan", ["demo", "train", "--out", "{out}", "--scale", "nan"], "--scale nan"),
    ("demo-threads-0", ["demo", "train", "--out", "{out}", "--threads", "0"], "--threads 0"),
    # ----- issue 22 #4: corrupt and absurd inputs
    ("surrogate-profile", ["profile", "-m", M, "-d", "a={surrogate}", "-o", "{out}"], "lone surrogate \\ud800"),
    ("surrogate-drivers", ["drivers", "-m", M, "-d", "a={surrogate}", "-o", "{out}"], "lone surrogate"),
    ("surrogate-eval", ["eval", "--model", M, "--data", "{surrogate}", "--out", "{out}"], "lone surrogate"),
    ("surrogate-label", ["profile", "-m", M, "-d", "a={surrogate_label}", "-o", "{out}"],
     "field 'label' holds a lone surrogate \\udfff"),
    ("truncated-profile", ["domains", "{trunc_run}"], "corrupt or truncated"),
    ("garbage-profile", ["domains", "{garbage_run}"], "corrupt or truncated"),
    ("foreign-profile", ["domains", "{foreign_run}"], "not an expertscope profile"),
    ("profile-is-directory", ["domains", "{dir_run}"], "is a directory"),
    ("gpus-negative", _profile("--gpus-per-worker", "-1", "-o", "{out}"), "--gpus-per-worker -1 is out of range"),
    ("gpus-negative-ray", _profile("--executor", "ray", "--gpus-per-worker", "-1", "-o", "{out}"),
     "--gpus-per-worker -1 is out of range"),
    ("gpus-nan", _profile("--gpus-per-worker", "nan", "-o", "{out}"), "--gpus-per-worker nan is not finite"),
    ("steer-up-1e308", ["steer-study", "-m", M, "--scale-up", "1e308", "-o", "{out}"], "overflows float32"),
    ("steer-down-1e39", ["steer-study", "-m", M, "--scale-down", "1e39", "-o", "{out}"], "overflows float32"),
    ("drivers-magnitude-1e308", ["drivers", "-m", M, "-d", "a={good}", "--magnitude", "1e308", "-o", "{out}"],
     "overflows float32"),
    ("lm-eval-steer-1e308", ["lm-eval", "-m", M, "--steer", "{st_huge}", "-o", "{out}"], "overflows float32"),
    ("lm-eval-steer-nan", ["lm-eval", "-m", M, "--steer", "{st_nan}", "-o", "{out}"], "scale=nan is not finite"),
    ("lm-eval-steer-inf", ["lm-eval", "-m", M, "--steer", "{st_inf}", "-o", "{out}"], "scale=inf is not finite"),
    ("lm-eval-steer-bool", ["lm-eval", "-m", M, "--steer", "{st_bool}", "-o", "{out}"], "True is not a number"),
    ("lm-eval-steer-dict", ["lm-eval", "-m", M, "--steer", "{st_dict}", "-o", "{out}"], "[layer, expert]"),
    ("lm-eval-steer-triple", ["lm-eval", "-m", M, "--steer", "{st_triple}", "-o", "{out}"], "[layer, expert]"),
    ("lm-eval-steer-negative", ["lm-eval", "-m", M, "--steer", "{st_negative}", "-o", "{out}"], ">= 0"),
    ("lm-eval-steer-empty", ["lm-eval", "-m", M, "--steer", "{st_empty}", "-o", "{out}"], "not valid JSON"),
    ("lm-eval-steer-dir", ["lm-eval", "-m", M, "--steer", "{inputs}", "-o", "{out}"], "is a directory"),
    ("weights-mismatch-config", _profile("-o", "{out}", "--model", "{mismatch}"),
     "is [4, 32, 48] in the checkpoint but [8, 32, 48] by the config"),
    ("weights-missing-tensor", _profile("-o", "{out}", "--model", "{missing}"), "lm_head.weight"),
    # ----- the probe's own: odd data files and specs
    ("empty-file", ["profile", "-m", M, "-d", "a={empty}", "-o", "{out}"], "has no rows"),
    ("blank-lines", ["profile", "-m", M, "-d", "a={blank_lines}", "-o", "{out}"], "has no rows"),
    ("blank-text", ["profile", "-m", M, "-d", "a={blank_text}", "-o", "{out}"], "empty 'text'"),
    ("label-list", ["profile", "-m", M, "-d", "a={label_list}", "-o", "{out}"], "field 'label' is a list"),
    ("answer-dict", ["profile", "-m", M, "-d", "a={answer_dict}", "-o", "{out}"], "field 'answer' is a dict"),
    ("eval-empty", ["eval", "--model", M, "--data", "{empty}", "--out", "{out}"], "has no rows"),
    ("eval-label-list", ["eval", "--model", M, "--data", "{label_list}", "--out", "{out}"], "is a list"),
    ("eval-data-dir", ["eval", "--model", M, "--data", "{inputs}", "--out", "{out}"], "is a directory"),
    ("dangling-symlink", ["profile", "-m", M, "-d", "a={dangling}", "-o", "{out}"], "not found"),
    ("domain-name-slash", ["profile", "-m", M, "-d", "a/b={good}", "-o", "{out}"], "must be letters"),
    ("domain-name-empty", ["profile", "-m", M, "-d", "={good}", "-o", "{out}"], "domain name is empty"),
    ("query-unknown-key", ["profile", "-m", M, "-d", "a={good}?foo=1", "-o", "{out}"], "unknown field key 'foo'"),
    ("model-is-data-file", _profile("-o", "{out}", "--model", "{good}"), "is a file"),
    ("path-length-99", _profile("--path-length", "99", "-o", "{out}"), "--path-length 99 is longer than the"),
    ("routes-domain-dotdot", ["profile", "--routes", "..={good}", "--num-experts", "4", "-o", "{out}"],
     "must be letters"),
    ("model-dir-without-config", _profile("-o", "{out}", "--model", "{trunc_run}"), "has no config.json"),
]


@pytest.mark.parametrize(("argv", "needle"), [(a, n) for _, a, n in CLI_CASES], ids=[i for i, _, _ in CLI_CASES])
def test_cli_misuse_is_one_line_exit_2_and_writes_nothing(argv: list[str], needle: str, inputs: dict[str, Path],
                                                         tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    fill = {k: str(v) for k, v in inputs.items()} | {"out": str(out), "inputs": str(inputs["model"].parent)}
    args = [a.format(**fill) for a in argv]
    before_inputs, before_work = _tree(inputs["model"].parent), _tree(tmp_path)
    r = runner.invoke(app, args)
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert r.exit_code == 2, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output
    assert len(lines) == 1, r.output
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert not out.exists()  # no directory, no manifest
    assert _tree(tmp_path) == before_work  # nothing written beside --out (the working directory)
    assert _tree(inputs["model"].parent) == before_inputs  # nor into the inputs


def test_bom_data_is_accepted(inputs: dict[str, Path]) -> None:
    good = es.data.sources.load_domain(f"a={inputs['good']}")
    bom = es.data.sources.load_domain(f"a={inputs['bom']}")
    assert [e.text for e in bom] == [e.text for e in good] and len(good) == 6


@pytest.fixture(scope="module")
def moe(inputs):
    return es.load_model(str(inputs["model"]))


API_CASES: list[tuple[str, Any, type[Exception], str]] = [
    ("profile-str", lambda m, i: es.profile(m, "not a list"), TypeError, "expected a Domain"),
    ("profile-dict-str", lambda m, i: es.profile(m, {"a": "text"}), TypeError, "not a list of texts"),
    ("profile-dict-ints", lambda m, i: es.profile(m, {"a": [1, 2]}), ValueError, "is a int"),
    ("profile-list-ints", lambda m, i: es.profile(m, [1, 2]), TypeError, "holds a int"),
    ("profile-batch-0", lambda m, i: es.profile(m, {"a": ["x y"]}, batch_size=0), ValueError, "batch_size"),
    ("load-domains-str", lambda m, i: es.data.sources.load_domains(f"a={i['good']}"), TypeError, "wrap it in a list"),
    ("load-domain-limit-0", lambda m, i: es.data.sources.load_domain(f"a={i['good']}", limit=0), ValueError,
     "limit=0"),
    ("load-domain-limit-neg", lambda m, i: es.data.sources.load_domain(f"a={i['good']}", limit=-1), ValueError,
     "limit=-1"),
    ("example-dict-text", lambda m, i: es.Example.from_dict({"text": {"a": 1}}), ValueError, "not text"),
    ("example-row-list", lambda m, i: es.Example.from_dict([1, 2]), ValueError, "not an object"),
    ("steering-json", lambda m, i: es.SteeringSpec.from_json('{"targets": 3}'), ValueError, "[layer, expert]"),
    ("steering-scale-nan", lambda m, i: es.SteeringSpec(targets=((0, 1),), scale=math.nan), ValueError, "scale"),
    ("study-z-inf", lambda m, i: StudyConfig(z=math.inf), ValueError, "z=inf is not finite"),
    ("study-scale-0", lambda m, i: StudyConfig(scale_up=0.0), ValueError, "scale_up=0.0"),
    ("study-limit-0", lambda m, i: StudyConfig(limit=0), ValueError, "limit=0"),
    ("device", lambda m, i: es.load_model(str(i["model"]), device="potato"), ValueError, "unknown device"),
    ("corrupt-weights", lambda m, i: es.load_model(str(i["truncated"])), ValueError, "corrupt or truncated"),
    ("profile-model-str", lambda m, i: es.profile("nope", {"a": ["x"]}), TypeError, "not an MoEModel"),
    ("domain-experts-str", lambda m, i: es.domain_experts("nope"), TypeError, "not a RoutingProfile"),
    ("evaluate-str", lambda m, i: es.evaluate(m, "classification", "nope"), TypeError, "list of Example"),
    ("steer-targets-str", lambda m, i: es.steer(m, targets="x"), TypeError, "(layer, expert) pairs"),
    ("study-domains-str", lambda m, i: StudyConfig(domains="a=synthetic:math"), TypeError, "wrap it in a list"),
    ("example-text-int", lambda m, i: es.Example(text=5), TypeError, "not a string"),
    ("steer-targets-short", lambda m, i: es.steer(m, targets=[(1,)]), TypeError, "(layer, expert) pairs"),
    # ----- issue 22 #4: the library's own errors, naming the expected type
    ("load-model-int", lambda m, i: es.load_model(123), TypeError, "path_or_id is a int, not a string"),
    ("load-model-none", lambda m, i: es.load_model(None), TypeError, "not a string"),
    ("driver-experts-str", lambda m, i: es.driver_experts("nope"), TypeError, "not CausalEffects"),
    ("router-hooks-str", lambda m, i: es.RouterHooks("nope"), TypeError, "not an MoEModel"),
    ("router-hooks-int", lambda m, i: es.RouterHooks(123), TypeError, "not an MoEModel"),
    ("lora-last99", lambda m, i: es.finetune_router(m, _train(), layers="last99", max_steps=1), ValueError,
     "asks for the last 99 MoE layers but the model has 3"),
    ("lora-last0", lambda m, i: es.finetune_router(m, _train(), layers="last0", max_steps=1), ValueError,
     "'last1' to 'last3'"),
    ("lora-no-layers", lambda m, i: es.finetune_router(m, _train(), layers=[], max_steps=1), ValueError,
     "adapts nothing"),
    ("lora-lr-nan", lambda m, i: es.finetune_router(m, _train(), lr=math.nan), ValueError, "lr=nan is not finite"),
    ("lora-model-str", lambda m, i: es.finetune_router("m", _train()), TypeError, "not an MoEModel"),
    ("lora-examples-str", lambda m, i: es.finetune_router(m, "x"), TypeError, "not a Domain or a list"),
    ("profile-empty-text", lambda m, i: es.profile(m, {"a": ["", "x y"]}), ValueError, "text 0 is empty"),
    ("profile-blank-text", lambda m, i: es.profile(m, {"a": ["x y", "  \n"]}), ValueError, "text 1 is empty"),
    ("profile-surrogate", lambda m, i: es.profile(m, {"a": ["x \ud800"]}), ValueError, "lone surrogate"),
    ("example-surrogate", lambda m, i: es.Example(text="a\udc80b"), ValueError, "lone surrogate \\udc80"),
    ("example-label-list", lambda m, i: es.Example.from_dict({"text": "x", "label": ["a"]}), ValueError, "is a list"),
    ("steer-scale-1e308", lambda m, i: es.steer(m, targets=[(0, 1)], scale=1e308), ValueError, "overflows float32"),
    ("steer-scale-inf", lambda m, i: es.steer(m, targets=[(0, 1)], scale=math.inf), ValueError, "not finite"),
    ("steer-scale-str", lambda m, i: es.steer(m, targets=[(0, 1)], scale="1.2"), TypeError, "scale='1.2' is a str"),
    ("study-scale-1e308", lambda m, i: StudyConfig(scale_down=1e308), ValueError, "scale_down=1e+308 overflows"),
    ("steer-model-str", lambda m, i: es.steer("m", targets=[(0, 1)]), TypeError, "not an MoEModel"),
    ("steer-spec-str", lambda m, i: es.steer(m, spec="x"), TypeError, "not a SteeringSpec"),
    ("steering-json-nan", lambda m, i: es.SteeringSpec.from_json('{"targets": [[0, 1]], "scale": NaN}'), ValueError,
     "steering JSON: scale=nan"),
    ("config-int-as-str", lambda m, i: es.ProfileConfig(batch_size="8"), TypeError, "batch_size='8' is a str"),
    ("config-limit-float", lambda m, i: es.ProfileConfig(limit=2.5), TypeError, "limit=2.5 is a float"),
    ("config-alpha-str", lambda m, i: es.DomainExpertConfig(alpha="0.05"), TypeError, "alpha='0.05' is a str"),
    ("config-scale-nan", lambda m, i: es.InterventionConfig(scale_up=math.nan), ValueError, "scale_up=nan"),
    ("config-sweep-huge", lambda m, i: es.InterventionConfig(dose_scales=(1.0, 1e308)), ValueError,
     "overflows float32"),
    ("config-magnitude-inf", lambda m, i: es.CausalConfig(magnitude=-math.inf), ValueError, "magnitude=-inf"),
    ("config-lr-nan", lambda m, i: es.InterventionConfig(finetune_lr=math.nan), ValueError, "finetune_lr"),
    ("domain-examples-str", lambda m, i: es.Domain("a", "text"), TypeError, "not a list of Example"),
    ("domain-examples-texts", lambda m, i: es.Domain("a", ["text"]), TypeError, "not an Example"),
    ("domain-name-int", lambda m, i: es.Domain(5, []), TypeError, "domain name 5 is a int"),
    ("domain-name-empty", lambda m, i: es.Domain(" ", []), ValueError, "domain name is empty"),
    ("profile-load-int", lambda m, i: es.RoutingProfile.load(123), TypeError, "not a path"),
    ("profile-load-truncated", lambda m, i: es.RoutingProfile.load(i["trunc_run"]), ValueError,
     "corrupt or truncated"),
    ("profile-load-foreign", lambda m, i: es.RoutingProfile.load(i["foreign_run"]), ValueError,
     "not an expertscope profile"),
    ("table-load-garbage", lambda m, i: es.DomainExpertTable.load(i["bad_table_run"] / "domain_experts.parquet"),
     ValueError, "cannot be read"),
    ("table-load-missing", lambda m, i: es.DomainExpertTable.load(i["inputs"] / "nope.parquet"), ValueError,
     "not found"),
    ("table-load-dir", lambda m, i: es.DriverTable.load(i["inputs"]), ValueError, "is a directory"),
    ("report-int", lambda m, i: es.report(123), TypeError, "run_dir is a int"),
    ("load-domains-none", lambda m, i: es.load_domains(None), TypeError, "not a list of NAME=SOURCE"),
    ("record-tokens-model-str", lambda m, i: es.record_tokens("m", {"a": ["x"]}), TypeError, "not an MoEModel"),
    ("causal-effects-model-str", lambda m, i: es.causal_effects("m", ["x"]), TypeError, "not an MoEModel"),
    ("causal-effects-empty", lambda m, i: es.causal_effects(m, ["x", ""]), ValueError, "is empty"),
    ("causal-rate-drivers-str", lambda m, i: es.causal_rate(m, {"a": ["x"]}, "nope"), TypeError, "not a DriverTable"),
    ("position-profile-str", lambda m, i: es.position_profile(m, {"a": ["x"]}, "nope"), TypeError, "drivers is a str"),
    ("executor-gpus-negative", lambda m, i: make_executor("local", gpus_per_worker=-1), ValueError,
     "gpus_per_worker=-1 is negative"),
    ("load-model-mismatch", lambda m, i: es.load_model(str(i["mismatch"])), ValueError, "do not fit its config.json"),
    ("load-model-missing", lambda m, i: es.load_model(str(i["missing"])), ValueError, "lack lm_head.weight"),
    # ----- issue 34 #5: every argument checked, nothing truncated or clamped
    ("load-routes-int", lambda m, i: es.load_routes(123), TypeError, "path is a int"),
    ("load-routes-none", lambda m, i: es.load_routes(None), TypeError, "path is a NoneType"),
    ("load-routes-top-k-0", lambda m, i: es.load_routes(i["routes_npy"], top_k=0), ValueError, "top_k=0"),
    ("load-routes-top-k-str", lambda m, i: es.load_routes(i["routes_npy"], top_k="2"), TypeError, "top_k='2'"),
    ("load-routes-layers-neg", lambda m, i: es.load_routes(i["routes_npy"], num_layers=-1), ValueError,
     "num_layers=-1"),
    ("load-routes-bool", lambda m, i: es.load_routes(i["routes_bool"]), ValueError, "are bool, not whole numbers"),
    ("profile-routes-list", lambda m, i: es.profile_routes([1, 2], 8), TypeError, "routes is a list"),
    ("profile-routes-int-value", lambda m, i: es.profile_routes({"a": 5}, 8), TypeError, "its routes is a int"),
    ("profile-routes-e-nan", lambda m, i: es.profile_routes({"a": _routes()}, math.nan), TypeError,
     "num_experts=nan is not an integer"),
    ("profile-routes-e-inf", lambda m, i: es.profile_routes({"a": _routes()}, math.inf), TypeError,
     "num_experts=inf"),
    ("profile-routes-e-str", lambda m, i: es.profile_routes({"a": _routes()}, "8"), TypeError, "num_experts='8'"),
    ("profile-routes-e-float", lambda m, i: es.profile_routes({"a": _routes()}, 8.9), TypeError, "num_experts=8.9"),
    ("profile-routes-name-int", lambda m, i: es.profile_routes({1: _routes()}, 8), TypeError, "domain name 1"),
    ("profile-routes-name-empty", lambda m, i: es.profile_routes({"": _routes()}, 8), ValueError,
     "domain name is empty"),
    ("profile-routes-layers-repeat", lambda m, i: es.profile_routes({"a": _routes()}, 8, layers=[0, 0]), ValueError,
     "distinct layer numbers"),
    ("profile-routes-bool", lambda m, i: es.profile_routes({"a": _routes().astype(bool)}, 8), ValueError,
     "not integer expert ids"),
    ("coactivation-path-str", lambda m, i: es.coactivation(_profile_of_routes(), path_length="3"), TypeError,
     "path_length='3'"),
    ("coactivation-path-99", lambda m, i: es.coactivation(_profile_of_routes(), path_length=99), ValueError,
     "longer than the 2 MoE layers"),
    ("coactivation-max-length-neg", lambda m, i: es.coactivation(m, {"a": ["x y"]}, max_length=-1), ValueError,
     "max_length=-1"),
    ("paths-top-nan", lambda m, i: es.coactivation(_profile_of_routes()).paths_frame(top=math.nan), TypeError,
     "top=nan"),
    ("paths-top-neg", lambda m, i: es.coactivation(_profile_of_routes()).paths_frame(top=-1), ValueError, "top=-1"),
    ("overlap-n-boot-neg", lambda m, i: es.routing_overlap(_profile_of_routes(), _profile_of_routes(), n_boot=-1),
     ValueError, "n_boot=-1"),
    ("overlap-n-boot-nan", lambda m, i: es.routing_overlap(_profile_of_routes(), _profile_of_routes(),
                                                           n_boot=math.nan), TypeError, "n_boot=nan"),
    ("study-seed-huge", lambda m, i: StudyConfig(seed=2**70), ValueError,
     "seed=1180591620717411303424 is out of range"),
    ("study-seed-float", lambda m, i: es.DriverConfig(seed=1.5), TypeError, "seed=1.5"),
    ("run-study-out-int", lambda m, i: es.run_study(StudyConfig(), out=123), TypeError, "out is a int"),
    ("run-study-no-stages", lambda m, i: es.run_study(StudyConfig(), out=None, stages=[]), ValueError,
     "stages=[] runs nothing"),
    ("domain-name-dotdot", lambda m, i: es.Domain("..", []), ValueError, "must be letters"),
    ("domain-name-slash", lambda m, i: es.Domain("a/b", []), ValueError, "must be letters"),
    ("domain-name-blank", lambda m, i: es.Domain("", []), ValueError, "domain name is empty"),
    ("domain-names-case", lambda m, i: es.load_domains(["m=synthetic:math?limit=2", "M=synthetic:math?limit=2"]),
     ValueError, "differ only in case"),
]


def _routes() -> Any:
    """Recorded routes of 2 sequences: [tokens, 2 MoE layers, k = 2], experts < 8."""
    import numpy as np

    g = np.random.default_rng(0)
    return np.stack([g.choice(8, size=2, replace=False) for _ in range(12)]).reshape(6, 2, 2)


def _profile_of_routes() -> Any:
    return es.profile_routes({"a": [_routes(), _routes()]}, 8)


def _train() -> es.Domain:
    return es.load_domain("t=synthetic:math?limit=4")


@pytest.mark.parametrize(("call", "exc", "needle"), [(c, e, n) for _, c, e, n in API_CASES],
                         ids=[i for i, _, _, _ in API_CASES])
def test_api_misuse_raises_a_typed_one_line_error(call, exc, needle, moe, inputs) -> None:
    with pytest.raises(exc) as info:
        call(moe, {**inputs, "inputs": inputs["model"].parent})
    assert isinstance(info.value, ExpertscopeError), repr(info.value)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_input_type_error_is_a_type_error() -> None:
    assert issubclass(InputTypeError, TypeError) and issubclass(InputTypeError, ExpertscopeError)


def test_a_full_disk_is_one_line_and_leaves_no_file(tmp_path: Path, monkeypatch) -> None:
    import errno

    from expertscope.io import write_json

    def full(*a: Any, **k: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OutputError, match=r"No space left on device.*free some disk space"):
        write_json(tmp_path / "x.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []


# ----- data-loss cases ------------------------------------------------------------------------------------
def _run_args(inputs: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["run", "--model", str(inputs["model"]), "--out", str(out), "--limit", "4", "--batch-size", "4",
            "-d", f"a={inputs['good']}", "-d", "b=synthetic:math", *extra]


@pytest.fixture
def profile_only(monkeypatch) -> None:
    """`run` with only its profile stage, so a finished run takes a second."""
    monkeypatch.setattr(PIPELINE, "stages", (PIPELINE.get("profile"),))


@pytest.mark.slow
def test_forced_run_that_fails_keeps_the_finished_run(inputs, tmp_path: Path, profile_only) -> None:
    out = tmp_path / "run"
    assert runner.invoke(app, _run_args(inputs, out)).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    r = runner.invoke(app, _run_args(inputs, out, "--force", "-m", "other"))
    assert r.exit_code == 2 and "cannot fetch" in r.output
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before  # the finished run's manifest and profile are back, byte for byte
    assert json.loads(after["manifest.json"])["status"] == "complete"


@pytest.mark.slow
def test_forced_run_reuses_nothing_stale(inputs, tmp_path: Path, profile_only) -> None:
    out, fresh = tmp_path / "run", tmp_path / "fresh"
    assert runner.invoke(app, _run_args(inputs, out)).exit_code == 0
    assert runner.invoke(app, _run_args(inputs, out, "--force", "--limit", "6")).exit_code == 0
    assert runner.invoke(app, _run_args(inputs, fresh, "--limit", "6")).exit_code == 0
    forced, ref = es.RoutingProfile.load(out), es.RoutingProfile.load(fresh)
    assert forced.totals()[0].tolist() == ref.totals()[0].tolist()  # tokens of 6 texts, not 4 + stale
    assert (forced.totals()[1]["sel"] == ref.totals()[1]["sel"]).all()
    assert not (out / ".replaced-run").exists()


@pytest.mark.slow
def test_resume_with_other_settings_is_refused_naming_the_difference(inputs, tmp_path: Path,
                                                                      profile_only) -> None:
    out = tmp_path / "run"
    assert runner.invoke(app, _run_args(inputs, out)).exit_code == 0
    before = _tree(out)
    r = runner.invoke(app, _run_args(inputs, out, "--resume", "--limit", "5"))
    assert r.exit_code == 2 and "limit: 4 → 5" in r.output and len(r.output.strip().splitlines()) == 1
    data = inputs["model"].parent / "changed.jsonl"
    data.write_text(inputs["good"].read_text().replace("things", "stuff"))
    r = runner.invoke(app, ["profile", "--model", str(inputs["model"]), "-d", f"a={inputs['good']}",
                            "-o", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["profile", "--model", str(inputs["model"]), "-d", f"a={data}", "-o",
                            str(tmp_path / "p"), "--resume"])
    assert r.exit_code == 2 and "data.a.source" in r.output
    data.unlink()
    assert _tree(out) == before


def test_resume_refuses_changed_data_file_contents(inputs, tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(inputs["good"].read_text())
    args = ["profile", "--model", str(inputs["model"]), "-d", f"a={data}", "-o", str(tmp_path / "p")]
    assert runner.invoke(app, args).exit_code == 0
    data.write_text(inputs["good"].read_text().replace("things", "stuff"))
    r = runner.invoke(app, [*args, "--resume"])
    assert r.exit_code == 2 and "data.a.sha256" in r.output


def test_lm_eval_never_writes_over_earlier_results(inputs, tmp_path: Path) -> None:
    out = tmp_path / "lm"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"kind": "lm-eval", "status": "complete"}))
    (out / "lm_eval_results.json").write_text('{"results": "earlier"}')
    before = _tree(out)
    r = runner.invoke(app, ["lm-eval", "-m", str(inputs["model"]), "-o", str(out)])
    assert r.exit_code == 2 and "--force" in r.output and "--resume" not in r.output
    assert _tree(out) == before
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    r = runner.invoke(app, ["lm-eval", "-m", str(inputs["model"]), "-o", str(other), "--force"])
    assert r.exit_code == 2 and "holds no expertscope run" in r.output
    assert (other / "mine.txt").read_text() == "keep"


def test_synth_advice_names_only_its_own_options(tmp_path: Path) -> None:
    out = tmp_path / "s"
    args = ["data", "synth", "--out", str(out), "--n-train", "2", "--n-validation", "2", "--n-test", "2"]
    assert runner.invoke(app, args).exit_code == 0
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "--force" in r.output and "--resume" not in r.output
    assert runner.invoke(app, [*args, "--force", "--seed", "1"]).exit_code == 0
    assert json.loads((out / "manifest.json").read_text())["config"]["seed"] == 1


@pytest.mark.slow
def test_two_writers_in_one_directory(inputs, tmp_path: Path) -> None:
    """A second process writing into a locked --out is refused with one line; the first one's files stay."""
    out = tmp_path / "p"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from expertscope.rundir import open_run_dir\n"
         "with open_run_dir(sys.argv[1], 'profile'):\n    print('locked', flush=True); sys.stdin.read()", str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        before = _tree(out)
        r = runner.invoke(app, ["profile", "--model", str(inputs["model"]), "-d", f"a={inputs['good']}",
                                "-o", str(out), "--force"])
        assert r.exit_code == 2 and "another expertscope process" in r.output and f"pid {holder.pid}" in r.output
        assert _tree(out) == before
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the lock
        holder.communicate(timeout=60)
    assert (out / ".expertscope.lock").exists()
    # Once the first writer is gone, the directory is free again, even though its lock file stayed behind.
    r = runner.invoke(app, ["profile", "--model", str(inputs["model"]), "-d", f"a={inputs['good']}",
                            "-o", str(out), "--force"])
    assert r.exit_code == 0, r.output


def test_report_names_unreadable_optional_tables(moe, tmp_path: Path, no_figures: list[str]) -> None:
    """An unreadable optional table is named on stderr; the report is still written (exit 0)."""
    from expertscope.data.sources import load_domains
    from expertscope.report.html import load_tables

    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"kind": "study", "status": "complete"}))
    prof = es.profile(moe, load_domains(["a=synthetic:math?limit=4", "b=synthetic:emotion?limit=4"]), batch_size=4)
    es.domain_experts(prof, rule="z", n_boot=0, n_perm=0).save(run / "domain_experts.parquet")
    (run / "drivers.parquet").write_bytes(b"garbage")
    problems: dict[str, str] = {}
    tables = load_tables(run, problems)
    assert "drivers" not in tables and "domain_experts" in tables and set(problems) == {"drivers.parquet"}
    r = runner.invoke(app, ["report", str(run), "-o", str(tmp_path / "r.html")])
    assert r.exit_code == 0, r.output
    assert "could not read drivers.parquet" in r.output and (tmp_path / "r.html").exists()
    assert not (run / ".expertscope.lock").exists()


def test_truncation_message_states_the_real_cap(inputs, tmp_path: Path) -> None:
    """--max-length 4096 on a model with a 256-token context: the message says 256, as the profile does."""
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"text": " ".join(["word"] * 400)}) + "\n")
    r = runner.invoke(app, ["profile", "-m", str(inputs["model"]), "-d", f"a={long}", "--max-length", "4096",
                            "-o", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    assert "truncated to 256 tokens" in r.output
    assert es.RoutingProfile.load(tmp_path / "p").config["max_length_used"] == 256


def test_unknown_lm_eval_task_is_named_with_close_matches(monkeypatch, tmp_path: Path) -> None:
    """The task check itself (lm-eval's own index takes ~15 s to build, so a stand-in index is used here)."""
    import lm_eval.tasks

    from expertscope.errors import ConfigError
    from expertscope.integrations.lm_eval import task_manager

    class Index:
        def __init__(self, include_path: str | None = None, include_defaults: bool = True) -> None:
            self.all_tasks = (["hellaswag", "arc_easy"] if include_defaults else []) + (
                ["mine"] if include_path else [])

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Index)
    assert task_manager(["mine"], tmp_path).all_tasks == ["mine"]  # found locally: no full index
    assert "hellaswag" in task_manager(["mine", "hellaswag"], tmp_path).all_tasks
    with pytest.raises(ConfigError, match="unknown lm-eval task 'helaswag': did you mean hellaswag"):
        task_manager(["arc_easy", "helaswag"])
    with pytest.raises(ConfigError, match="no lm-eval task given"):
        task_manager([])


def test_read_only_output_is_refused_before_anything_runs(inputs, tmp_path: Path, monkeypatch) -> None:
    """Root ignores file modes, so a read-only directory is stood in for by os.access saying so."""
    real = os.access
    ro = tmp_path / "ro"
    ro.mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if Path(p) == ro else real(p, mode, *a, **k))
    r = runner.invoke(app, ["profile", "-m", str(inputs["model"]), "-d", f"a={inputs['good']}",
                            "-o", str(ro / "out")])
    assert r.exit_code == 2 and "is not writable" in r.output and list(ro.iterdir()) == []


def test_interrupted_synth_keeps_nothing_and_a_forced_one_restores_the_old_data(tmp_path: Path,
                                                                                  monkeypatch) -> None:
    from expertscope.data import synthetic

    out = tmp_path / "s"
    args = ["data", "synth", "--out", str(out), "--n-train", "2", "--n-validation", "2", "--n-test", "2"]
    real, calls = synthetic.generate, []

    def interrupted_on_third(*a: Any, **k: Any) -> Any:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(synthetic, "generate", interrupted_on_third)
    r = runner.invoke(app, args)
    assert r.exit_code == 130 and "--resume" not in r.output and not out.exists()
    monkeypatch.setattr(synthetic, "generate", real)
    assert runner.invoke(app, args).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls.clear()
    monkeypatch.setattr(synthetic, "generate", interrupted_on_third)
    r = runner.invoke(app, [*args, "--force", "--seed", "5"])
    assert r.exit_code == 130
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier data, back in place


def test_forced_resumable_run_keeps_the_old_run_aside_until_the_new_one_finishes(tmp_path: Path) -> None:
    from expertscope.rundir import ASIDE_NAME, open_run_dir

    out = tmp_path / "r"
    with open_run_dir(out, "profile", {"settings": {"a": 1}}) as rd:
        (rd.path / "table.parquet").write_text("old")
        rd.write_manifest("complete")
    with pytest.raises(KeyboardInterrupt), open_run_dir(out, "profile", {"settings": {"a": 2}}, force=True) as rd:
        (rd.path / "table.parquet").write_text("new, partial")
        raise KeyboardInterrupt
    assert (out / ASIDE_NAME / "table.parquet").read_text() == "old"  # not yet deleted: new run unfinished
    with pytest.raises(OutputError, match=r"a: 2 → 3"), open_run_dir(out, "profile", {"settings": {"a": 3}},
                                                                      resume=True):
        pass
    with open_run_dir(out, "profile", {"settings": {"a": 2}}, resume=True) as rd:
        assert rd.previous["status"] == "running"
        rd.write_manifest("complete")
    assert not (out / ASIDE_NAME).exists() and (out / "table.parquet").read_text() == "new, partial"


def test_a_force_killed_while_moving_aside_loses_nothing(tmp_path: Path) -> None:
    """SIGKILL between moving the first old file aside and the manifest: the next --force finishes the move, and
    when that run fails before writing anything, every old file is back."""
    from expertscope.rundir import ASIDE_NAME, open_run_dir

    out = tmp_path / "r"
    with open_run_dir(out, "profile", {"settings": {"a": 1}}) as rd:
        for name in ("one.parquet", "two.parquet"):
            (rd.path / name).write_text(name)
        rd.write_manifest("complete")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / ASIDE_NAME).mkdir()
    os.replace(out / "one.parquet", out / ASIDE_NAME / "one.parquet")  # the killed move
    with pytest.raises(RuntimeError), open_run_dir(out, "profile", {"settings": {"a": 2}}, force=True):
        raise RuntimeError("model failed to load")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# ----- issue 22 #4: corrupt input, API misuse and third-party noise, beyond one-line cases ----------------
def test_a_second_router_finetune_without_unload_is_refused(moe) -> None:
    """PEFT would fail with "please open an issue"; the library says what to do instead."""
    first = es.finetune_router(moe, _train(), max_steps=1, batch_size=2)
    try:
        with pytest.raises(es.ConfigError, match=r"already carries a router LoRA adapter: call \.unload\(\)"):
            es.finetune_router(moe, _train(), max_steps=1, batch_size=2)
    finally:
        first.unload()
    again = es.finetune_router(moe, _train(), max_steps=1, batch_size=2)  # after unload() it works again
    again.unload()
    assert again.settings["layers"] == "last3" and len(again.adapted) == 3  # what was asked is what was adapted


def test_a_steering_product_that_overflows_is_refused(inputs) -> None:
    """A scale float32 can hold (1e37) times router logits of ~1e2 overflows to inf: refused at the first
    forward, not routed on NaN. The same scale on the unscaled model's small logits is fine."""
    import torch

    m = es.load_model(str(inputs["model"]))
    batch = m.tokenizer(["hello world"], return_tensors="pt")
    with es.steer(m, targets=[(0, 1)], scale=1e37):
        assert torch.isfinite(m.model(**batch).logits).all()
    with torch.no_grad():
        m.site(0).module.weight.mul_(1e4)  # router logits of layer 0 become ~1e2..1e3
    with pytest.raises(es.ConfigError, match=r"overflows torch\.float32"), es.steer(m, targets=[(0, 1)], scale=1e37):
        m.model(**batch)


def test_float16_routers_refuse_a_scale_they_cannot_hold(inputs) -> None:
    import torch

    m = es.load_model(str(inputs["model"]), dtype="float16")
    batch = m.tokenizer(["hello world"], return_tensors="pt")
    with pytest.raises(es.ConfigError, match=r"does not fit the torch.float16 router logits.*65504"), \
            es.steer(m, targets=[(0, 1)], scale=1e5):
        m.model(**batch)
    with es.steer(m, targets=[(0, 1)], scale=1.2):
        assert torch.isfinite(m.model(**batch).logits.float()).all()


def test_resume_over_a_truncated_profile_is_one_line(inputs, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for f in inputs["trunc_run"].iterdir():
        (run / f.name).write_bytes(f.read_bytes())
    damaged = (run / "profile.safetensors").read_bytes()
    r = runner.invoke(app, ["profile", "-m", str(inputs["model"]), "-d", f"a={inputs['texts']}", "-d",
                            "b=synthetic:math?limit=4", "-o", str(run), "--resume"])
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "corrupt or truncated" in lines[0], r.output
    assert "--force" in lines[0] and (run / "profile.safetensors").read_bytes() == damaged


def test_load_reports_stay_off_stderr(inputs, capfd) -> None:
    """transformers prints a 20-line LOAD REPORT for weights that do not fit the config; the library keeps it
    off stderr and raises (or, for unused tensors, warns) in one line naming the tensor."""
    with pytest.raises(es.ModelError):
        es.load_model(str(inputs["mismatch"]))
    with pytest.raises(es.ModelError):
        es.load_model(str(inputs["missing"]))
    with pytest.warns(UserWarning, match=r"holds extra\.weight, which its config\.json does not use"):
        m = es.load_model(str(inputs["extra"]))
    assert m.num_experts == 4
    err = capfd.readouterr().err
    assert "LOAD REPORT" not in err and "MISMATCH" not in err and "UNEXPECTED" not in err, err


def test_lm_eval_git_noise_stays_off_stderr(tmp_path: Path, monkeypatch, capfd) -> None:
    """lm-eval runs `git describe` in the working directory; outside a repository git says `fatal: ...`."""
    import shutil

    from lm_eval import evaluator

    from expertscope.integrations.lm_eval import _quiet_git

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    if shutil.which("git"):
        evaluator.get_git_commit_hash()
        assert "not a git repository" in capfd.readouterr().err  # the noise this test is about
    with _quiet_git():
        assert evaluator.get_git_commit_hash() is None
    assert capfd.readouterr().err == ""
    assert evaluator.get_git_commit_hash is not None and evaluator.get_git_commit_hash.__module__.startswith("lm_eval")


def test_lm_eval_checks_steering_targets_before_lm_eval_starts(moe, monkeypatch) -> None:
    """An expert out of range fails before HFLM is built (whose two warnings used to precede the error)."""
    import lm_eval.models.huggingface as hf

    from expertscope.integrations.lm_eval import lm_eval_steered

    def no_hflm(*a: Any, **k: Any) -> None:
        raise AssertionError("HFLM built before the steering targets were checked")

    monkeypatch.setattr(hf, "HFLM", no_hflm)
    spec = es.SteeringSpec(targets=((0, 99),), scale=1.2)
    with pytest.raises(es.ConfigError, match=r"expert 99 does not exist at layer 0: choose 0\.\.3"):
        lm_eval_steered(moe, ["t"], steering=spec, manager=object())


def test_cli_warnings_are_one_line() -> None:
    import warnings

    from expertscope.cli.main import one_line_warning

    assert one_line_warning(UserWarning("a\n  b"), UserWarning, "f.py", 3) == "warning: a b\n"
    assert one_line_warning(RuntimeWarning("x"), RuntimeWarning, "f.py", 3) == "warning (RuntimeWarning): x\n"
    assert warnings.formatwarning is not one_line_warning  # only the console entry point installs it


def test_valid_unicode_and_bom_steering_files_are_accepted(moe, tmp_path: Path) -> None:
    """The surrogate check must not refuse real characters outside the BMP, and a BOM is not an error."""
    prof = es.profile(moe, {"a": ["café 😀 naïve", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 text"], "b": ["plain words here"]})
    assert prof.num_sequences == {"a": 2, "b": 1}
    path = tmp_path / "s.json"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"targets": [[0, 1]], "scale": 1.5}')
    assert es.SteeringSpec.load(path).scale == 1.5


# ----- issue 34: nothing written outside the output directory, nothing of the user's lost --------------------
def _run_copy(inputs: dict[str, Path], tmp_path: Path, name: str = "run") -> Path:
    """A fresh copy of the finished profile run (its manifest lists what it wrote)."""
    import shutil

    return Path(shutil.copytree(inputs["profile_run"], tmp_path / name))


def _profile_into(inputs: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["profile", "-m", str(inputs["model"]), "-d", f"a={inputs['texts']}", "-d", "b=synthetic:math?limit=4",
            "-o", str(out), *extra]


def _one_line_exit_2(r: Any, needle: str) -> None:
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert r.exit_code == 2, r.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.output


@pytest.mark.parametrize("command", ["profile --force", "report"])
def test_a_lock_file_that_is_a_link_is_refused_and_its_target_untouched(inputs, tmp_path: Path,
                                                                      command: str) -> None:
    run = _run_copy(inputs, tmp_path)
    victim = tmp_path / "users_file.txt"
    victim.write_text("precious\n")
    (run / ".expertscope.lock").symlink_to(victim)
    before = _tree(run)
    argv = _profile_into(inputs, run, "--force") if command == "profile --force" else ["report", str(run)]
    r = runner.invoke(app, argv)
    _one_line_exit_2(r, ".expertscope.lock is a symbolic link")
    assert victim.read_text() == "precious\n" and _tree(run) == before


def test_force_never_moves_a_run_into_a_linked_aside(inputs, tmp_path: Path) -> None:
    run = _run_copy(inputs, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (run / ".replaced-run").symlink_to(elsewhere, target_is_directory=True)
    before = _tree(run)
    r = runner.invoke(app, _profile_into(inputs, run, "--force"))
    _one_line_exit_2(r, ".replaced-run is a symbolic link")
    assert not list(elsewhere.iterdir()) and _tree(run) == before


def test_report_never_writes_through_a_linked_figures_directory(inputs, tmp_path: Path) -> None:
    run = _run_copy(inputs, tmp_path)
    assert runner.invoke(app, ["domains", str(run)]).exit_code == 0  # a run the report can read
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    import shutil

    shutil.rmtree(run / "figures", ignore_errors=True)
    (run / "figures").symlink_to(elsewhere, target_is_directory=True)
    r = runner.invoke(app, ["report", str(run)])
    _one_line_exit_2(r, "figures is a symbolic link")
    assert not list(elsewhere.iterdir()) and not (run / "report.html").exists()


@pytest.mark.parametrize("target", ["manifest.json", "domain_experts.parquet", "profile.safetensors",
                                    "routing_mi.parquet"])
def test_report_and_compare_refuse_an_out_file_that_would_replace_a_run_file(inputs, tmp_path: Path,
                                                                            target: str) -> None:
    run = _run_copy(inputs, tmp_path)
    assert runner.invoke(app, ["domains", str(run)]).exit_code == 0
    other = _run_copy(inputs, tmp_path, "other")
    assert runner.invoke(app, ["domains", str(other)]).exit_code == 0
    before = _tree(run)
    r = runner.invoke(app, ["report", str(other), "-o", str(run / target)])
    _one_line_exit_2(r, f"would replace its {'manifest' if target == 'manifest.json' else target}")
    r = runner.invoke(app, ["compare", str(run), str(other), "-o", str(run / target)])
    _one_line_exit_2(r, "would replace")
    assert _tree(run) == before
    # a file of its own beside the run's is fine, twice (the second time it replaces only itself)
    for _ in range(2):
        assert runner.invoke(app, ["report", str(other), "-o", str(run / "other-report.html")]).exit_code == 0
    assert {k: v for k, v in _tree(run).items() if k in before} == before


def test_force_leaves_a_users_own_file_in_place(inputs, tmp_path: Path) -> None:
    run = _run_copy(inputs, tmp_path)
    (run / "my_notes.txt").write_text("notes on this run\n")
    r = runner.invoke(app, _profile_into(inputs, run, "--force"))
    assert r.exit_code == 0, r.output
    assert (run / "my_notes.txt").read_text() == "notes on this run\n"
    assert not (run / ".replaced-run").exists()
    manifest = json.loads((run / "manifest.json").read_text())
    assert "my_notes.txt" not in manifest["outputs"] and "profile.safetensors" in manifest["outputs"]
    # and a forced run that fails puts the old run back, the user's file still in place
    r = runner.invoke(app, _profile_into(inputs, run, "--force", "-m", "someorg/some-moe"))
    assert r.exit_code == 2 and (run / "my_notes.txt").read_text() == "notes on this run\n"
    assert json.loads((run / "manifest.json").read_text())["status"] == "complete"


@pytest.mark.parametrize(("spec", "needle"), [
    ("..={texts}", "must be letters"), (".={texts}", "must be letters"), ("-x={texts}", "must be letters"),
    ("a\tb={texts}", "must be letters"), ("x" * 65 + "={texts}", "must be letters"),
])
def test_domain_names_are_safe_identifiers_on_the_command_line(inputs, tmp_path: Path, spec: str,
                                                               needle: str) -> None:
    out = tmp_path / "out"
    r = runner.invoke(app, ["profile", "-m", str(inputs["model"]), "-d", spec.format(texts=inputs["texts"]),
                            "-o", str(out)])
    _one_line_exit_2(r, needle)
    assert not out.exists()


def test_domain_names_differing_only_in_case_are_refused(inputs, tmp_path: Path) -> None:
    r = runner.invoke(app, ["profile", "-m", str(inputs["model"]), "-d", f"Math={inputs['texts']}", "-d",
                            "math=synthetic:math?limit=4", "-o", str(tmp_path / "out")])
    _one_line_exit_2(r, "differ only in case")
    r = runner.invoke(app, ["profile", "--routes", f"../x={inputs['texts']}", "--num-experts", "4", "-o",
                            str(tmp_path / "out2")])
    _one_line_exit_2(r, "must be letters")


def test_a_domain_named_like_a_path_cannot_write_outside_the_adapter_directory(moe, tmp_path: Path) -> None:
    with pytest.raises(es.DataError, match="must be letters"):
        es.Domain("../../x", [es.Example(text="a", answer="1")], "math")
    # and a write below an open run directory that would leave it is refused, naming the path
    from expertscope.io import atomic_write, write_root

    with write_root(tmp_path / "run"), pytest.raises(OutputError, match="outside the output directory"), \
            atomic_write(tmp_path / "run" / ".." / "escaped.txt") as fh:
        fh.write("x")
    assert not (tmp_path / "escaped.txt").exists()
