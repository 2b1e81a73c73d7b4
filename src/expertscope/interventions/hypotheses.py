"""Pre-registered hypotheses, confirmed later on items that never found them.

After discovery a study writes ``hypotheses.json`` before any confirmation item is evaluated: per domain and
kind (domain experts, drivers) the exact expert set, the predicted direction of the change in accuracy at
each of the paper's strengths (masking and down-weighting lower it, up-weighting raises it), the predicted
selectivity, the discovery items (count, digest and each item's short hash), the settings and the model's
shape, sealed by a SHA-256 of its canonical JSON. :func:`confirm` tests exactly those hypotheses, with the
calibrated verdicts of the steering study, on new data or another checkpoint of the same architecture, and
:func:`compare` sets predicted beside observed. A file whose content no longer matches its hash is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from ..config import InterventionConfig
from ..data.parts import digest, item_hash, refuse_shared, shared_items
from ..data.types import Domain
from ..errors import ConfigError, DataError
from ..execution import Executor
from ..io import read_json, write_json, write_table
from ..progress import ProgressCallback
from .steering_study import CONTROL_NAMES, KINDS, InterventionResult, Strength, intervention_study, ranked_targets

SCHEMA = "expertscope.hypotheses/1"
#: Short hashes of the discovery items kept in the file (hex digits of :func:`item_hash`).
ITEM_HASH_DIGITS = 16
#: The columns of the confirmation table (one row per corpus × hypothesis × prediction).
COLUMNS = ("corpus", "source", "domain", "kind", "strength", "n_targets", "predicted", "n", "delta", "delta_lo",
           "delta_hi", "diff", "diff_lo", "diff_hi", "q_vs_control", "specific", "control", "observed", "outcome",
           "note")
Outcome = Literal["confirmed", "opposite", "not confirmed", "not measured"]

__all__ = ["COLUMNS", "SCHEMA", "Confirmation", "Hypotheses", "Hypothesis", "check_architecture", "check_items",
           "compare", "confirm", "pre_register", "predictions"]


@dataclass
class Hypothesis:
    """One pre-registered hypothesis: ``domain``'s ``kind`` experts ``experts`` (``(layer, expert)``) change
    its accuracy in the direction ``predictions[strength label]`` (``"lower"`` or ``"higher"``) beyond equally
    busy control experts, and (``selective``) masking them costs ``domain`` more than any other domain."""

    domain: str
    kind: Literal["domain", "driver"]
    experts: list[tuple[int, int]]
    predictions: dict[str, str]
    selective: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"domain": self.domain, "kind": self.kind, "experts": [list(x) for x in self.experts],
                "predictions": dict(self.predictions), "selective": self.selective}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Hypothesis:
        return cls(str(d["domain"]), d["kind"], [(int(a), int(b)) for a, b in d["experts"]],
                   {str(k): str(v) for k, v in d["predictions"].items()}, bool(d.get("selective", True)))


@dataclass
class Hypotheses:
    """Everything a confirmation needs, fixed before it: the hypotheses, the model's ``source`` and shape
    (``layers``, ``num_experts``), the ``discovery`` items per domain (``n``, ``digest``, ``items``: short
    hashes), the intervention ``settings``, each domain's discovery ``activation`` rates (for equally busy
    controls: ``[[layer, expert, rate], ...]``) and the ``created`` time."""

    hypotheses: list[Hypothesis]
    model: dict[str, Any]
    discovery: dict[str, dict[str, Any]]
    settings: dict[str, Any]
    activation: dict[str, list[list[float]]] = field(default_factory=dict)
    created: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The content the hash seals (everything but the hash)."""
        return {"schema": SCHEMA, "created": self.created, "model": self.model, "discovery": self.discovery,
                "settings": self.settings, "activation": self.activation,
                "hypotheses": [h.to_dict() for h in self.hypotheses]}

    @property
    def hash(self) -> str:
        """SHA-256 of the canonical JSON of :meth:`to_dict` (sorted keys, no spaces)."""
        return _seal(self.to_dict())

    def save(self, path: str | Path) -> Path:
        """Write the file (atomically) with its hash; returns its path."""
        write_json(path, {**self.to_dict(), "hash": self.hash})
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Hypotheses:
        """Read a hypotheses file; a file edited after it was written (its content no longer matches its hash),
        or not a hypotheses file at all, is refused with one line."""
        d = read_json(path, "hypotheses file")
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            raise DataError(f"{path} is not a hypotheses file (schema {SCHEMA}): pass the hypotheses.json a study "
                            "wrote (`expertscope run` writes RUN_DIR/hypotheses.json)")
        sealed = d.pop("hash", None)
        try:
            out = cls([Hypothesis.from_dict(h) for h in d["hypotheses"]], d["model"], d["discovery"],
                      d["settings"], d.get("activation", {}), d.get("created", ""))
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{path} is damaged ({type(e).__name__}: {e}): pass the hypotheses.json a study "
                            "wrote") from None
        if sealed != out.hash or _seal(d) != sealed:
            raise DataError(f"{path} was changed after it was written (its content no longer matches its hash "
                            f"{str(sealed)[:12]}…): hypotheses are fixed before confirmation; restore the file or "
                            "rerun discovery for new ones")
        return out

    def config(self) -> InterventionConfig:
        """The intervention settings the hypotheses were registered with, at the predicted strengths only (the
        paper's ↑, ↓ and ablation), without the router LoRA (confirmation trains nothing)."""
        base = InterventionConfig.from_dict(self.settings["intervention"])
        return base.replace(dose_scales=(), dose_biases=(), finetune=False)

    def discovery_hashes(self, domain: str) -> set[str]:
        return set(self.discovery.get(domain, {}).get("items", ()))


def _seal(d: Mapping[str, Any]) -> str:
    text = json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def predictions(cfg: InterventionConfig) -> dict[str, str]:
    """The predicted direction per strength label: the paper's ↑ raises accuracy, ↓ and ablation lower it."""
    out = {Strength(cfg.mode, cfg.scale_up).label: "higher", Strength(cfg.mode, cfg.scale_down).label: "lower"}
    if cfg.dose_mask:
        out[Strength("mask").label] = "lower"
    return out


def pre_register(domain_table: Any, driver_table: Any, config: InterventionConfig, *, model_source: str,
                 layers: Sequence[int], num_experts: int, discovery: Sequence[Domain],
                 rules: Mapping[str, str] | None = None, seed: int = 0) -> Hypotheses:
    """The hypotheses of a discovery: per domain of ``discovery`` and kind, the flagged experts of
    ``domain_table`` / ``driver_table`` (all of them, strongest first), with the predictions of
    :func:`predictions` and the predicted selectivity; ``discovery`` the domains whose items found them."""
    from .controls import activation_rates

    hyps = []
    for d in discovery:
        for kind in KINDS:
            table = domain_table if kind == "domain" else driver_table
            experts = ranked_targets(table, d.name, kind) if table is not None else []
            if experts:
                hyps.append(Hypothesis(d.name, kind, experts, predictions(config), selective=True))
    disc = {d.name: {**digest(d.examples), "items": sorted({item_hash(e)[:ITEM_HASH_DIGITS] for e in d.examples})}
            for d in discovery}
    act = {d.name: [[layer, expert, round(rate, 9)] for (layer, expert), rate
                    in sorted(activation_rates(domain_table, d.name).items())] for d in discovery}
    # JSON-normal (lists, not tuples), so the object equals what its file reads back
    settings = json.loads(json.dumps({"intervention": config.to_dict(), "rules": dict(rules or {}), "seed": seed}))
    return Hypotheses(hyps, {"source": model_source, "layers": [int(x) for x in layers],
                             "num_experts": int(num_experts)}, disc, settings, act,
                      datetime.now(UTC).isoformat(timespec="seconds"))


# ----- comparison -----------------------------------------------------------------------------------------
def _direction(lo: float, hi: float) -> str:
    return "lower" if hi < 0 else "higher" if lo > 0 else "no change"


def compare(hyp: Hypotheses, result: InterventionResult, corpus: str, sources: Mapping[str, str] | None = None,
            overlap: Mapping[str, int] | None = None, saturation: float = 0.95) -> pd.DataFrame:
    """Predicted beside observed (:data:`COLUMNS`): one row per hypothesis and predicted strength, and one for
    its predicted selectivity, read from ``result``'s dose and selectivity tables.

    ``outcome``: ``confirmed`` (specific beyond the controls, in the predicted direction), ``opposite``
    (specific, the other way), ``not confirmed`` (no effect beyond the controls) or ``not measured`` (the
    domain was not evaluated, or the row has no verdict; ``note`` says why). ``corpus`` names the data
    (``"confirmation part"``, ``"second corpus"``), ``sources`` each domain's source; ``overlap``: per domain,
    confirmation items that were also discovery items (said in ``note``). A prediction the data cannot show is
    ``not measured``, said in ``note``: a loss where the unsteered accuracy is at the floor (``<= 1 -
    saturation``), a gain where it is saturated (``>= saturation``).
    """
    dose, sel = result.dose, result.selectivity
    table = result.table
    base = ({str(r.domain): float(r.accuracy) for r in table[table["condition"] == "original"].itertuples()}
            if len(table) and "condition" in table.columns else {})
    rows = []
    for h in hyp.hypotheses:
        shared = (overlap or {}).get(h.domain, 0)
        note = f"{shared} item(s) also in discovery (--allow-overlap)" if shared else ""
        acc = base.get(h.domain, float("nan"))
        cannot = {"lower": f"floor: unsteered accuracy {acc:.3f} on this corpus, so a loss cannot show"
                  if acc <= 1 - saturation else "",
                  "higher": f"saturated: unsteered accuracy {acc:.3f} on this corpus, so a gain cannot show"
                  if acc >= saturation else ""}
        fixed = {"corpus": corpus, "source": (sources or {}).get(h.domain, ""), "domain": h.domain, "kind": h.kind,
                 "n_targets": len(h.experts)}
        for strength, predicted in h.predictions.items():
            m = dose[(dose["domain"] == h.domain) & (dose["kind"] == h.kind) & (dose["strength"] == strength)] \
                if len(dose) else dose
            got = _observed(m.iloc[0].to_dict() if len(m) else None, predicted, len(h.experts), note)
            rows.append({**fixed, "strength": strength, "predicted": predicted, **_untestable(got, cannot[predicted])})
        s = sel[(sel["kind"] == h.kind) & (sel["ablated"] == h.domain) & (sel["evaluated"] == h.domain)] \
            if len(sel) else sel
        got = _selective(s.iloc[0].to_dict() if len(s) else None, h.selective, note)
        rows.append({**fixed, "strength": "selectivity", "predicted": "selective" if h.selective else "not selective",
                     **_untestable(got, cannot["lower"])})
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _untestable(got: dict[str, Any], why: str) -> dict[str, Any]:
    """``got`` (a measured row), or ``not measured`` with ``why`` first in its note when the data cannot show the
    predicted change (the measured numbers are kept)."""
    if not why or got["outcome"] == "not measured":
        return got
    return {**got, "outcome": "not measured", "note": "; ".join(x for x in (why, got["note"]) if x)}


def _missing(v: Any) -> bool:
    """A verdict cell with no verdict (None or NaN)."""
    return v is None or (isinstance(v, float) and math.isnan(v))


def _observed(r: dict[str, Any] | None, predicted: str, n_targets: int, note: str) -> dict[str, Any]:
    nan = float("nan")
    if r is None or not bool(r.get("applicable", True)) or _missing(r.get("specific")):
        why = "not evaluated on this corpus" if r is None else str(r.get("reason") or r.get("control_reason")
                                                                     or "no verdict")
        return {"n": nan, "delta": nan, "delta_lo": nan, "delta_hi": nan, "diff": nan, "diff_lo": nan,
                "diff_hi": nan, "q_vs_control": nan, "specific": None, "control": "", "observed": "",
                "outcome": "not measured", "note": "; ".join(x for x in (why, note) if x)}
    if int(r.get("n_targets") or 0) != n_targets:
        raise DataError(f"the steering table's {r['domain']} {r['kind']} set has {r.get('n_targets')} experts where "
                        f"the hypothesis has {n_targets}: the tables and hypotheses.json come from different runs")
    specific = bool(r["specific"])
    observed = _direction(float(r["diff_lo"]), float(r["diff_hi"])) if specific else "no change beyond controls"
    outcome: Outcome = ("confirmed" if observed == predicted else "opposite") if specific else "not confirmed"
    return {"n": r.get("n"), "delta": r.get("delta"), "delta_lo": r.get("delta_lo"), "delta_hi": r.get("delta_hi"),
            "diff": r.get("diff"), "diff_lo": r.get("diff_lo"), "diff_hi": r.get("diff_hi"),
            "q_vs_control": r.get("q_vs_control"), "specific": specific,
            "control": CONTROL_NAMES.get(str(r.get("control")), str(r.get("control") or "")),
            "observed": observed, "outcome": outcome, "note": note}


def _selective(r: dict[str, Any] | None, predicted: bool, note: str) -> dict[str, Any]:
    nan = float("nan")
    empty = {"n": nan, "delta": nan, "delta_lo": nan, "delta_hi": nan, "diff": nan, "diff_lo": nan, "diff_hi": nan,
             "q_vs_control": nan, "specific": None, "control": ""}
    if r is None or _missing(r.get("selective")):
        why = "selectivity not measured on this corpus" if r is None else str(r.get("selective_reason") or "no verdict")
        return {**empty, "observed": "", "outcome": "not measured", "note": "; ".join(x for x in (why, note) if x)}
    got = bool(r["selective"])
    outcome: Outcome = "confirmed" if got == predicted else "not confirmed"
    return {**empty, "n": r.get("n"), "delta": r.get("delta"), "delta_lo": r.get("delta_lo"),
            "delta_hi": r.get("delta_hi"), "diff": r.get("norm_delta"), "diff_lo": r.get("norm_lo"),
            "diff_hi": r.get("norm_hi"), "observed": "selective" if got else "not selective", "outcome": outcome,
            "note": "; ".join(x for x in (str(r.get("selective_reason") or ""), note) if x)}


# ----- confirmation ---------------------------------------------------------------------------------------
@dataclass
class Confirmation:
    """The comparison ``table`` (:data:`COLUMNS`) and the steering study behind it (``result``)."""

    table: pd.DataFrame
    result: InterventionResult | None
    settings: dict[str, Any] = field(default_factory=dict)

    def save(self, directory: str | Path) -> None:
        """``confirmation.parquet`` (and ``.csv``) and the steering tables into ``directory``."""
        d = Path(directory)
        if self.result is not None:
            self.result.save(d)
        write_table(d / "confirmation.parquet", self.table, meta={"table": "confirmation", **self.settings})


def _tables(hyp: Hypotheses) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Domain-expert and driver tables holding exactly the hypotheses' sets (strongest first) and the discovery
    activation rates, as the steering study reads them."""
    dom_rows, drv_rows = [], []
    for d, rates in hyp.activation.items():
        for layer, expert, rate in rates:
            dom_rows.append({"domain": d, "layer": int(layer), "expert": int(expert), "activation_rate": float(rate),
                             "is_domain_expert": False, "specificity": 0.0})
    dom = pd.DataFrame(dom_rows, columns=["domain", "layer", "expert", "activation_rate", "is_domain_expert",
                                          "specificity"])
    for h in hyp.hypotheses:
        for rank, (layer, expert) in enumerate(h.experts):
            score = float(len(h.experts) - rank)  # keeps the registered order (strongest first)
            if h.kind == "domain":
                hit = (dom["domain"] == h.domain) & (dom["layer"] == layer) & (dom["expert"] == expert)
                if hit.any():
                    dom.loc[hit, ["is_domain_expert", "specificity"]] = [True, score]
                else:
                    dom.loc[len(dom)] = [h.domain, layer, expert, float("nan"), True, score]
            else:
                drv_rows.append({"domain": h.domain, "layer": layer, "expert": expert, "is_driver": True,
                                 "ce_mean": score})
    return dom, pd.DataFrame(drv_rows, columns=["domain", "layer", "expert", "is_driver", "ce_mean"])


def check_architecture(hyp: Hypotheses, model: Any) -> None:
    """The model has the MoE layers and experts the hypotheses name (another checkpoint of the same
    architecture), or a one-line error."""
    layers = [int(s.layer) for s in model.sites]
    experts = max((int(s.num_experts) for s in model.sites), default=0)
    want = hyp.model
    if layers != list(want["layers"]) or experts != int(want["num_experts"]):
        raise ConfigError(f"the model has MoE layers {layers} with {experts} experts, but the hypotheses were "
                          f"registered on {want['source']} with layers {want['layers']} and {want['num_experts']} "
                          "experts: confirm on a checkpoint of the same architecture")


def check_items(hyp: Hypotheses, domains: Sequence[Domain], allow_overlap: bool = False) -> dict[str, int]:
    """Per domain, how many of ``domains``' items were discovery items (from the short hashes in the file);
    refused unless ``allow_overlap``."""
    seen = {d.name: hyp.discovery_hashes(d.name) for d in domains}
    return refuse_shared(shared_items(seen, domains, ITEM_HASH_DIGITS), allow_overlap,
                         "item(s) of the confirmation data found the hypotheses (discovery items), so they cannot "
                         "confirm them")


def confirm(hypotheses: Hypotheses | str | Path, model: Any, domains: Sequence[Domain], *,
            config: InterventionConfig | None = None, allow_overlap: bool = False,
            corpus: str = "second corpus", executor: Executor | None = None,
            progress: ProgressCallback | None = None) -> Confirmation:
    """Test pre-registered hypotheses on ``domains`` (new data; names as in the hypotheses) with ``model`` (the
    discovery checkpoint or another of the same architecture): the steering study, at the registered settings
    (``config`` overrides them, e.g. a smaller ``limit``), on exactly the registered sets, with equally busy
    controls matched on the discovery activation rates; then :func:`compare`.

    Refuses a changed hypotheses file, a model of another shape, domains none of which has a hypothesis, and
    items that were discovery items (unless ``allow_overlap``: then every affected row says so).
    """
    from ..models.model import MoEModel
    from ..validation import check_type

    hyp = hypotheses if isinstance(hypotheses, Hypotheses) else Hypotheses.load(hypotheses)
    check_type(model, MoEModel, "model", "an MoEModel (es.load_model(...))")
    check_architecture(hyp, model)
    named = {h.domain for h in hyp.hypotheses}
    used = [d for d in domains if d.name in named and d.task is not None]
    if not used:
        raise DataError(f"no domain given is named like a hypothesis' domain with a task ({', '.join(sorted(named))}"
                        "): name the confirmation data alike, e.g. -d math=FILE?task=math")
    overlap = check_items(hyp, used, allow_overlap)
    cfg = config or hyp.config()
    dom_table, drv_table = _tables(hyp)
    labelled: ProgressCallback | None = None
    if progress is not None:
        report_to = progress

        def labelled(task: str, done: int, total: int) -> None:  # told apart from the study's own steering
            report_to(f"confirmation {task}", done, total)

    result = intervention_study(model, used, dom_table, drv_table, config=cfg, executor=executor,
                                progress=labelled)
    table = compare(hyp, result, corpus, {d.name: d.source or d.name for d in used}, overlap, cfg.saturation)
    table = table[table["domain"].isin([d.name for d in used])].reset_index(drop=True)
    return Confirmation(table, result, {"hypotheses_hash": hyp.hash, "overlap": overlap,
                                        "model": str(getattr(model, "source", ""))})
