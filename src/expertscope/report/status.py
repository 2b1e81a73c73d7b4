"""The banner of a run that did not finish: which stages are missing, in words."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# ----- run status: the banner of a run that did not finish ------------------------------------------------
#: The stages of ``expertscope run`` in order (``pipeline.PIPELINE.study()``; a test keeps the two equal). Used
#: for manifests that do not list their ``planned_stages``.
STUDY_STAGES = ("profile", "coactivation", "drivers", "domain_experts", "replication", "causal_rate", "tokens",
                "expert_map", "hypotheses", "steering", "routing_overlap", "confirmation", "report")

@dataclass
class RunStatus:
    """A run's manifest status: ``finished`` stages (recorded complete) and ``missing`` ones (planned, not
    finished; the report stage itself left out). ``complete`` is the manifest's ``status == "complete"``."""

    status: str
    complete: bool
    finished: list[str]
    missing: list[str]

def run_status(manifest: dict[str, Any]) -> RunStatus:
    """What :func:`status_sentence` needs from a manifest. Planned stages come from the manifest's
    ``planned_stages``, else (a study) :data:`STUDY_STAGES`; a run of another kind without that list has no
    known missing stages."""
    status = str(manifest.get("status") or "unknown")
    raw = manifest.get("stages")
    stages: dict[str, Any] = raw if isinstance(raw, dict) else {}
    finished = [k for k, v in stages.items()
                if not k.startswith("_") and isinstance(v, dict) and v.get("status") == "complete"]
    planned = manifest.get("planned_stages")
    if not isinstance(planned, list):
        planned = list(STUDY_STAGES) if manifest.get("kind", "study") == "study" else []
    missing = [str(s) for s in planned if s not in finished and s != "report"]
    return RunStatus(status, status == "complete", finished, missing)

def status_sentence(manifest: dict[str, Any], run: str | None = None) -> str | None:
    """The banner of a run whose manifest is not ``complete``: its status and the stages it did not finish;
    ``None`` for a complete run."""
    st = run_status(manifest)
    if st.complete:
        return None
    who = f"Run {run}" if run else "This run"
    if st.missing:
        what = (f"stage{'s' if len(st.missing) > 1 else ''} {', '.join(st.missing)} did not finish, so "
                f"{'their sections are' if len(st.missing) > 1 else 'its section is'} missing and the findings "
                "are partial")
    elif st.finished:
        what = f"only {', '.join(st.finished)} finished; the findings may be partial"
    else:
        what = "no stage is recorded as finished; the findings may be partial"
    return (f"{who} is not complete (manifest status “{st.status}”): {what}. Finish it with the command that "
            "started it and --resume, then rebuild the report.")


__all__ = ["STUDY_STAGES", "RunStatus", "run_status", "status_sentence"]
