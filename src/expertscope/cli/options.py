"""Option definitions shared by several commands, so every command spells them alike."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..config import CausalConfig, InterventionConfig, ProfileConfig
from ..study import StudyConfig

#: The settings every command takes its option defaults from, so the CLI never re-spells a default and a
#: changed default reaches the command line and the library alike.
PROFILE = ProfileConfig()
CAUSAL = CausalConfig()
INTERVENTION = InterventionConfig()
STUDY = StudyConfig()

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Local HF model directory, a hub id, 'demo' or "
                                                         "'demo-deepseek' (the bundled demos).")]
DomainOpt = Annotated[
    list[str] | None,
    typer.Option("--domain", "-d", help="NAME=SOURCE[?text=FIELD&label=FIELD...]; SOURCE is a .jsonl/.csv/.parquet "
                 "file, hf:ID[:CONFIG][@SPLIT], preset:gsm8k|mmlu|emotion or synthetic:emotion|knowledge|math."),
]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output directory (one run per directory).")]
DtypeOpt = Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1, mps ... (default: where the model loads).")]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", help="Texts per forward pass.")]
LimitOpt = Annotated[int | None, typer.Option(help="At most this many texts per domain.")]
SeedOpt = Annotated[int, typer.Option(help="Random seed (written to the manifest).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run in --out.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite a finished run in --out.")]
TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Run the model repository's own code.")]
PickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="Allow pickled (.bin) weights from a trusted source.")]
TextFieldOpt = Annotated[str, typer.Option("--text-field", help="Column holding the text, for every --domain.")]
LabelFieldOpt = Annotated[str | None, typer.Option("--label-field", help="Column holding the label, if any.")]
AnswerFieldOpt = Annotated[str | None, typer.Option("--answer-field", help="Column holding the answer, if any.")]
ExecutorOpt = Annotated[str, typer.Option(help="local, or ray (Ray Data actors; pip install 'expertscope[ray]').")]
WorkersOpt = Annotated[int, typer.Option(help="Ray actors (each loads the model once).")]
GpusOpt = Annotated[float, typer.Option("--gpus-per-worker", help="GPUs per Ray actor (>1: device_map='auto').")]

# Sizes of a study (expertscope run / steer-study).
StudyLimitOpt = Annotated[int | None, typer.Option("--limit",
                                                   help="Texts per domain for profiling, tokens, causal rate.")]
CausalLimitOpt = Annotated[int | None, typer.Option("--causal-limit", help="Texts per domain for causal effects.")]
EvalLimitOpt = Annotated[int | None, typer.Option("--eval-limit", help="Test examples per domain (steering study).")]
TrainLimitOpt = Annotated[int | None, typer.Option("--train-limit", help="Training examples per domain (router LoRA).")]
NBootOpt = Annotated[int, typer.Option("--n-boot", help="Bootstrap resamples for the CIs.")]


def field_map(text_field: str, label_field: str | None, answer_field: str | None) -> dict[str, str]:
    out = {"text": text_field}
    if label_field:
        out["label"] = label_field
    if answer_field:
        out["answer"] = answer_field
    return out
