"""Everything checked before the first stage, without the model: the device, the model's location, every
domain spec, every row each chosen stage will read (labels, answers, choices: each stage's ``row_check``),
and settings that depend on the data (``n_perm`` against the number of tests). A failed check is one line
naming the fix, and nothing is written."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..config import StudyConfig
from ..data.checks import check_domain_specs, check_stage_inputs
from ..data.parts import item_hash, refuse_shared, shared_items
from ..data.sources import load_domains
from ..errors import ConfigError, DataError
from ..evaluation import validate_examples
from ..integrations.lm_eval import SYNTHETIC_TASKS, task_manager
from ..interventions.steering import SteeringSpec
from ..models.loading import ModelSource
from ..validation import check_device
from .context import StudyInputs
from .registry import PIPELINE

__all__ = ["eval_rows", "prepare", "second_rows", "split_rows", "task_rows"]


def _task_rows(domains: Sequence[Any]) -> None:
    """Every row of every task domain has what its task needs (label in the domain's label set, answer,
    choices): the evaluation and the decision positions read them."""
    for d in domains:
        if d.task is None:
            continue
        if d.task == "classification" and (d.labels is not None and len(d.labels) < 2):
            raise DataError(f"domain {d.name!r} has one label ({d.labels[0]!r}): classification needs two or more; "
                            "check the label field, or give the set with ?labels=a,b,c")
        try:
            validate_examples(d.task, d.examples, d.labels)
        except DataError as e:
            raise DataError(f"domain {d.name!r}: {e}") from None


def task_rows(inputs: StudyInputs) -> None:
    """The drivers stage's rows: the domains' own."""
    _task_rows(inputs.domains)


def split_rows(inputs: StudyInputs) -> None:
    """The steering stage's rows: the test and train splits."""
    _task_rows([*(inputs.test or ()), *(inputs.train or ())])


def second_rows(inputs: StudyInputs) -> None:
    """The confirmation stage's rows: the second corpora's."""
    _task_rows(inputs.second or ())


def eval_rows(inputs: StudyInputs) -> None:
    """The eval stage's rows: every domain needs a task."""
    for d in inputs.domains:
        if d.task is None:
            raise DataError(f"domain {d.name!r} has no task to evaluate: add ?task=classification|multiple_choice|"
                            "math to its spec (or --task)")
    _task_rows(inputs.domains)


def _check_lm_eval(config: StudyConfig) -> None:
    """lm-eval's task names and steering file, checked before the model loads."""
    c = config.lm_eval
    if c.steer:
        SteeringSpec.load(c.steer)
    synthetic = [t for t in c.tasks if t in SYNTHETIC_TASKS.values()]
    others = [t for t in c.tasks if t not in synthetic]
    if others:
        task_manager(others, None if synthetic else c.include_path)  # unknown names fail here, fast


def _check_n_perm(config: StudyConfig, inputs: StudyInputs) -> None:
    """Refuse a permutation count too small for the number of tests D·L·E before the model loads (the
    smallest p-value 1/(n_perm+1) could never pass Benjamini–Hochberg), when the model's config tells L and E."""
    cfg = config.domain_experts
    shape = inputs.model.moe_shape()
    if cfg.rule != "fdr" or cfg.n_perm == "auto" or cfg.test == "normal" or shape is None or len(inputs.domains) < 2:
        return
    n_layers, n_experts = shape
    m = len(inputs.domains) * n_layers * n_experts
    if cfg.test == "auto":  # the same choice domain_experts makes: permutation when its work fits the budget
        work = float(cfg.n_perm) * len(inputs.domains) * sum(len(d) for d in inputs.domains) * (2 * m + 1)
        if work > cfg.perm_budget:
            return
    if int(cfg.n_perm) + 1 < m / cfg.alpha:
        raise ConfigError(f"n_perm={cfg.n_perm} is too few for {m} tests ({len(inputs.domains)} domains × "
                          f"{n_layers} MoE layers × {n_experts} experts): the smallest p-value 1/(n_perm+1) cannot "
                          f"pass BH at alpha={cfg.alpha}; pass --n-perm {math.ceil(m / cfg.alpha)} or more, or 'auto'")


def _check_overlap(inputs: StudyInputs, allowed: bool) -> dict[str, int]:
    """Per domain, how many confirmation or training items are also discovery items; refused unless
    ``allowed`` (the parts of one source never overlap; a second corpus or a hand-given split might)."""
    seen = {d.name: {item_hash(e) for e in d.examples} for d in inputs.domains}
    later = [x for p in (inputs.test or [], inputs.train or [], inputs.second or []) for x in p]
    return refuse_shared(shared_items(seen, later), allowed, "confirmation or training item(s) are also discovery "
                         "items, so the same items would find the experts and test them")


def _check_hypotheses(config: StudyConfig, second: Sequence[Any]) -> dict[str, int]:
    """`expertscope confirm`, before the model loads: the file is intact, some corpus is named like a hypothesis'
    domain, and no item of the corpora found the hypotheses (unless allowed)."""
    from ..interventions.hypotheses import Hypotheses, check_items

    hyp = Hypotheses.load(config.hypotheses or "")
    shape = ModelSource.resolve(config.model).moe_shape()
    want = (len(hyp.model["layers"]), int(hyp.model["num_experts"]))
    if shape is not None and shape != want:
        raise ConfigError(f"{config.model} has {shape[0]} MoE layers of {shape[1]} experts, but the hypotheses were "
                          f"registered on {hyp.model['source']} with {want[0]} of {want[1]}: confirm on a checkpoint "
                          "of the same architecture")
    named = {h.domain for h in hyp.hypotheses}
    if not any(d.name in named and d.task is not None for d in second):
        raise DataError(f"no domain given is named like a hypothesis' domain with a task ({', '.join(sorted(named))}"
                        "): name the confirmation data alike, e.g. -d math=FILE?task=math")
    return check_items(hyp, second, config.allow_overlap)


def prepare(config: StudyConfig, stages: Sequence[str] | None = None) -> StudyInputs:
    """Parse and check every input once, before any stage or model load: device, model source, domain specs,
    every row each chosen stage reads, and data-dependent settings. Raises one-line errors naming the fix."""
    chosen = [s.name for s in PIPELINE.chosen(stages)]
    if PIPELINE.tables_only(chosen):
        return StudyInputs(None, (), [])  # earlier tables only: no model, no data
    check_device(config.device)
    source = ModelSource.resolve(config.model)
    if "lm_eval" in chosen:
        _check_lm_eval(config)
    if PIPELINE.data_free(chosen):
        return StudyInputs(source, (), [])
    parts = {p for n in chosen if PIPELINE.get(n).needs_data for p in PIPELINE.get(n).parts}
    split = {"part_seed": config.seed, "part_fractions": config.parts}
    if config.hypotheses is not None and parts <= {"confirm", "second"}:
        # `expertscope confirm`: the new corpora only, checked against the hypotheses' own discovery items
        parts = {"second"}
        inputs = StudyInputs(source, (), [])
    else:
        specs = check_domain_specs(config.domain_specs)
        check_stage_inputs(specs, chosen)
        discovery = "discovery" if parts - {"all"} else None  # eval alone reads every item
        inputs = StudyInputs(source, specs, load_domains(specs, limit=config.limit, seed=config.seed,
                                                         part=discovery, **split))
    if "confirm" in parts or "train" in parts:
        inputs.test = load_domains(config.split_specs("test"), limit=config.intervention.limit, seed=config.seed,
                                   part="confirm", **split)
        inputs.train = load_domains(config.split_specs("train"), limit=config.train_limit, seed=config.seed,
                                    part="train", **split)
    if "second" in parts and config.confirm_specs:
        # A second corpus is independent by construction: every item of it (up to the evaluation limit).
        specs_2 = check_domain_specs(config.confirm_specs, "--confirm")
        inputs.second = load_domains(specs_2, limit=config.intervention.limit, seed=config.seed)
    if inputs.test is not None or inputs.second is not None:
        inputs.overlap = _check_overlap(inputs, config.allow_overlap)
    if config.hypotheses is not None and inputs.second is not None:
        inputs.overlap.update(_check_hypotheses(config, inputs.second))
    for name in chosen:
        PIPELINE.get(name).check_rows(inputs)
    if "domain_experts" in chosen:
        _check_n_perm(config, inputs)
    shape = inputs.model.moe_shape() if inputs.model is not None else None
    if "profile" in chosen and shape is not None:  # a path longer than the model is refused before it loads
        from ..stats.coactivation import resolve_path_length

        resolve_path_length(config.profile.path_length, shape[0], "--path-length")
    return inputs
