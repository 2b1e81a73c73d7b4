"""Routes recorded by a serving or training engine: statistics from expert indices alone, no model in memory.

Formats (checked against the engines' own source; see docs/reference.md, "Routes recorded by vLLM, SGLang and
Megatron"):

- ``"vllm"`` — ``--enable-return-routed-experts``: ``prompt_routed_experts`` (request level) and
  ``routed_experts`` (per choice / ``CompletionOutput``), int16 ``[tokens, moe_layers, k]``; over HTTP as
  nested JSON lists or a base64 ``.npy``. Files: ``.npy`` (one sequence), ``.npz`` (one array per
  sequence), or ``.json``/``.jsonl`` response records. Prefix-cached positions are ``-1``: they are counted
  (``prefix_cached``) and left out.
- ``"sglang"`` — ``--enable-return-routed-experts``: ``meta_info["routed_experts"]``, base64 int32,
  ``reshape(-1, L, k)``; a flat array, so ``num_layers`` and ``top_k`` must be given.
- ``"sglang-dump"`` — ``--expert-distribution-recorder-mode per_token``: a ``torch.save`` file whose
  ``records`` hold ``input_ids``, ``positions``, ``forward_mode`` and ``topk_ids_of_layer [L, tokens, 8]``.
  The recorder assumes k = 8 (``_TOP_K_NUM = 8``): a model with a smaller k fills the other columns with -1
  (give ``top_k``); layers it never recorded (dense layers) are all -1 and are dropped;
  ``last_physical_to_logical_map`` (EPLB), when present, maps physical expert slots to experts. Extend
  (prefill) forwards are split into sequences where ``positions`` restarts at 0.
- ``"megatron"`` — ``--moe-routing-trace-path DIR``: ``router_trace_rank{r}.jsonl``, one record per
  (step, router) with ``step``, ``block``, ``layer``, ``rank``, ``num_tokens``, ``topk``, ``top_indices``.
  A step's decoder routers form one group of tokens ``[num_tokens, L, k]``; MTP routers are left out.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import ConfigError, DataError

RouteFormat = Literal["auto", "vllm", "sglang", "sglang-dump", "megatron"]
FORMATS = ("vllm", "sglang", "sglang-dump", "megatron")

#: What cannot be computed from expert indices alone, and why.
NOT_APPLICABLE = {
    "entropy": "needs the router logits (recorded routes hold expert indices only)",
    "cwas": "needs the routing entropy, hence the router logits",
    "gate_mean": "needs the gate weights (recorded routes hold expert indices only)",
    "importance": "needs the expert outputs (no model in memory)",
    "ce": "needs the model: causal effects perturb its logits",
}


@dataclass
class RecordedRoutes:
    """Sequences of recorded routes: each ``(T_i, L, k)`` int64, column 0 as the engine listed it.

    ``prefix_cached``: positions marked -1 (vLLM prefix cache hits) that were left out; ``notes``: the
    quirks met while reading, in words.
    """

    sequences: list[np.ndarray]
    format: str
    source: str = ""
    prefix_cached: int = 0
    notes: list[str] = field(default_factory=list)
    layers: list[int] | None = None
    """The layer numbers the engine gave (Megatron's ``layer``), kept as given; None: ``0..L-1``."""
    quirks: dict[str, int] = field(default_factory=dict)
    """Known engine quirks met, each counted (:data:`QUIRKS` says what each is and the rule applied)."""

    @property
    def shape(self) -> tuple[int, int]:
        """``(L, k)`` shared by every sequence."""
        return (self.sequences[0].shape[1], self.sequences[0].shape[2]) if self.sequences else (0, 0)

    @property
    def n_tokens(self) -> int:
        return int(sum(len(s) for s in self.sequences))


# ----- decoding ------------------------------------------------------------------------------------------
def _ids(value: Any, where: str, what: str = "expert ids") -> np.ndarray:
    """``value`` as an int64 array of whole numbers; a ragged, text, boolean or fractional value is a one-line
    DataError naming ``where`` (never truncated: 3.7 is not expert 3)."""
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{where}: {what} are not a rectangular array ({_first(exc)}): check the file") from None
    if arr.dtype == object or arr.dtype.kind in "USb" or arr.dtype == np.bool_:
        kind = "mixed or ragged values" if arr.dtype == object else arr.dtype.name
        raise DataError(f"{where}: {what} are {kind}, not whole numbers: pass the engine's expert indices")
    if arr.dtype.kind == "f" and arr.size:
        odd = ~np.isfinite(arr) | (arr != np.round(arr))
        if odd.any():
            raise DataError(f"{where}: {what} hold {arr[odd].ravel()[0]!r}, not a whole number: pass the engine's "
                            "expert indices")
    return arr.astype(np.int64)


def _first(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:120]


def _decode_npy_b64(text: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(base64.b64decode(text, validate=True)), allow_pickle=False)
    except Exception as exc:
        raise DataError(f"a routed_experts string is not a base64 .npy array ({_first(exc)}): check the "
                        "format") from None


def _vllm_array(value: Any, where: str) -> np.ndarray | None:
    """A vLLM routed-experts value (array, nested lists or base64 .npy) as ``(T, L, k)`` int64."""
    if value is None:
        return None
    arr = _ids(_decode_npy_b64(value) if isinstance(value, str) else value, where, "routed experts")
    if arr.size == 0:
        return None
    if arr.ndim != 3:
        raise DataError(f"{where}: routed experts of shape {arr.shape}, expected [tokens, moe_layers, k]")
    return arr


def _vllm_record(rec: Mapping[str, Any], where: str) -> list[np.ndarray]:
    """One vLLM response (HTTP JSON or an offline ``RequestOutput`` as a dict): prompt routes followed by
    each choice's routes, one sequence per choice."""
    prompt = _vllm_array(rec.get("prompt_routed_experts"), where)
    choices = rec.get("choices") or rec.get("outputs") or []
    if not isinstance(choices, list):
        raise DataError(f"{where}: 'choices' is a {type(choices).__name__}, not a list of completions: check the "
                        "response")
    outs = [_vllm_array(c.get("routed_experts"), f"{where} choice {i}") for i, c in enumerate(choices)
            if isinstance(c, Mapping)]
    if rec.get("routed_experts") is not None:
        outs.append(_vllm_array(rec.get("routed_experts"), where))
    parts = [o for o in outs if o is not None]
    if not parts:
        return [prompt] if prompt is not None else []
    if prompt is not None and any(o.shape[1:] != prompt.shape[1:] for o in parts):
        bad = next(o for o in parts if o.shape[1:] != prompt.shape[1:])
        raise DataError(f"{where}: a completion's routes have (layers, k) {bad.shape[1:]} but the prompt's "
                        f"{prompt.shape[1:]}: one model per response")
    return [np.concatenate([prompt, o]) if prompt is not None else o for o in parts]


def _sglang_record(rec: Mapping[str, Any], where: str, num_layers: int | None, top_k: int | None
                   ) -> np.ndarray | None:
    meta = rec.get("meta_info", rec)
    value = meta.get("routed_experts") if isinstance(meta, Mapping) else None
    if value is None:
        return None
    if num_layers is None or top_k is None:
        raise ConfigError(f"{where}: SGLang's routed_experts is a flat int32 array: pass the number of MoE "
                          "layers and top_k (--moe-layers L --top-k K) to reshape it")
    if isinstance(value, str):
        try:
            raw = base64.b64decode(value, validate=True)
        except ValueError as exc:
            raise DataError(f"{where}: routed_experts is not valid base64 ({_first(exc)}): check the "
                            "response") from None
        if len(raw) % 4:
            raise DataError(f"{where}: routed_experts holds {len(raw)} bytes, not whole int32 ids: check the "
                            "response")
        flat = np.frombuffer(raw, dtype=np.int32).astype(np.int64)
    else:
        flat = _ids(value, where, "routed_experts").ravel()
    if flat.size % (num_layers * top_k):
        raise DataError(f"{where}: {flat.size} expert ids do not split into tokens x {num_layers} layers x "
                        f"k={top_k}: check --moe-layers and --top-k")
    return flat.reshape(-1, num_layers, top_k).astype(np.int64)


def _json_records(path: Path) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path.name} is not UTF-8 text (byte {exc.start}): pass the engine's JSON or JSONL "
                        "output, or the right --routes-format for a binary file") from None
    try:
        data = json.loads(text)
        return data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        pass
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n} is not JSON ({exc.msg}): pass a JSON or JSONL file") from exc
    return out


def _megatron(records: Iterable[Mapping[str, Any]], where: str, notes: list[str]
              ) -> tuple[list[np.ndarray], list[int]]:
    """The sequences of a Megatron router trace, ``(T, L, k)`` per (rank, step), and the layer numbers as the
    trace gives them."""
    groups: dict[tuple[int, int], dict[int, np.ndarray]] = {}
    skipped = 0
    for n, rec in enumerate(records, 1):
        at = f"{where} line {n}"
        if not isinstance(rec, Mapping):
            raise DataError(f"{at} is a JSON {type(rec).__name__}, not a router record: pass Megatron's "
                            "router_trace_rank*.jsonl")
        if rec.get("block", "decoder") != "decoder":
            skipped += 1
            continue
        missing = [k for k in ("top_indices", "num_tokens", "topk", "layer", "step") if k not in rec]
        if missing:
            raise DataError(f"{at} has no {missing[0]!r}: pass Megatron's router trace records")
        try:
            num_tokens, topk = int(rec["num_tokens"]), int(rec["topk"])
            layer, step, rank = int(rec["layer"]), int(rec["step"]), int(rec.get("rank", 0))
        except (TypeError, ValueError):
            raise DataError(f"{at}: num_tokens, topk, layer, step and rank must be whole numbers: check the "
                            "trace") from None
        flat = _ids(rec["top_indices"], at, "top_indices").ravel()
        if flat.size != num_tokens * topk:
            raise DataError(f"{at}: {flat.size} top_indices do not reshape to num_tokens {num_tokens} x topk "
                            f"{topk}: check the trace")
        idx = flat.reshape(num_tokens, topk)
        rec = {**rec, "layer": layer, "step": step}
        key = (rank, step)
        layers = groups.setdefault(key, {})
        if int(rec["layer"]) in layers:
            raise DataError(f"{where}: layer {rec['layer']} appears twice in step {rec['step']} of rank "
                            f"{key[0]}: pass one trace per run")
        layers[int(rec["layer"])] = idx
    if skipped:
        notes.append(f"{skipped} MTP router records left out (only decoder layers are profiled)")
    if len({r for r, _ in groups}) > 1:
        notes.append("several ranks read: with tensor parallelism ranks repeat the same tokens, so pass one "
                     "rank's file unless ranks saw different data")
    out = []
    numbers = sorted({la for layers in groups.values() for la in layers})
    for key in sorted(groups):
        layers = groups[key]
        counts = {v.shape[0] for v in layers.values()}
        if len(counts) != 1:
            raise DataError(f"{where}: step {key[1]} of rank {key[0]} has layers with different token counts")
        if sorted(layers) != numbers:
            raise DataError(f"{where}: step {key[1]} of rank {key[0]} has layers {sorted(layers)}, others "
                            f"{numbers}: pass whole traces")
        out.append(np.stack([layers[la] for la in sorted(layers)], axis=1))
    if numbers and numbers != list(range(numbers[0], numbers[0] + len(numbers))):
        notes.append(f"layers {numbers} as the trace numbers them (not consecutive: the others are dense or not "
                     "traced)")
    return out, numbers


def _sglang_dump(obj: Any, where: str, top_k: int | None, notes: list[str]) -> list[np.ndarray]:
    records = obj.get("records", []) if isinstance(obj, Mapping) else obj
    if not isinstance(records, list | tuple):
        raise DataError(f"{where}: the dump's records are a {type(records).__name__}, not a list: pass the file "
                        "/dump_expert_distribution_record wrote")
    mapping = obj.get("last_physical_to_logical_map") if isinstance(obj, Mapping) else None
    if mapping is not None:
        mapping = _ids(_to_numpy(mapping), where, "last_physical_to_logical_map")
        if mapping.ndim != 2:
            raise DataError(f"{where}: last_physical_to_logical_map has shape {mapping.shape}, expected [layers, "
                            "physical slots]")
        notes.append("physical expert slots mapped to experts with last_physical_to_logical_map")
    k = 8 if top_k is None else top_k
    out: list[np.ndarray] = []
    dropped_layers: set[int] = set()
    for n, rec in enumerate(records):
        if not isinstance(rec, Mapping) or "topk_ids_of_layer" not in rec:
            raise DataError(f"{where}: record {n} has no topk_ids_of_layer: pass SGLang's per-token dump")
        ids = _ids(_to_numpy(rec["topk_ids_of_layer"]), f"{where} record {n}", "topk_ids_of_layer")  # [L, T, 8]
        if ids.ndim != 3:
            raise DataError(f"{where}: record {n}'s topk_ids_of_layer has shape {ids.shape}, expected [layers, "
                            "tokens, 8]")
        if mapping is not None and mapping.shape[0] != ids.shape[0]:
            raise DataError(f"{where}: last_physical_to_logical_map has {mapping.shape[0]} layers, the records "
                            f"{ids.shape[0]}: pass the map of this dump")
        T = len(rec.get("input_ids", ids[0]))
        ids = ids[:, :T]
        if ids.shape[2] < k:
            raise DataError(f"{where}: record {n} holds {ids.shape[2]} experts per token, fewer than top_k={k}")
        recorded = ids[(ids[:, :, 0] >= 0)]  # (tokens x recorded layers, 8)
        if top_k is None and recorded.size and (recorded == -1).all(axis=0).any():
            raise ConfigError(f"{where}: SGLang's per-token dump assumes k = 8 but these records use fewer "
                              "columns: pass the model's top_k (--top-k K)")
        ids = ids[:, :, :k]
        if mapping is not None:
            flat = np.take_along_axis(mapping, np.maximum(ids, 0).reshape(ids.shape[0], -1), axis=1)
            ids = np.where(ids >= 0, flat.reshape(ids.shape), -1)
        unrecorded = [la for la in range(ids.shape[0]) if T and (ids[la] == -1).all()]
        dropped_layers.update(unrecorded)
        keep = [la for la in range(ids.shape[0]) if la not in dropped_layers]
        routes = ids[keep].transpose(1, 0, 2)  # [T, L, k]
        positions = np.asarray(_to_numpy(rec.get("positions", np.arange(T))), dtype=np.int64)[:T]
        starts = [i for i in range(T) if positions[i] == 0]
        if not starts or starts[0] != 0:
            starts = [0, *starts]
        out.extend(routes[a:b] for a, b in zip(starts, [*starts[1:], T], strict=True) if b > a)
    if top_k is not None and top_k < 8:
        notes.append(f"SGLang's per-token dump assumes k = 8: the first {top_k} columns are used")
    if dropped_layers:
        notes.append(f"dump layers {sorted(dropped_layers)} were never recorded (dense layers): left out")
        L = min(s.shape[1] for s in out) if out else 0
        out = [s[:, -L:] if s.shape[1] != L else s for s in out]
    return out


def _to_numpy(x: Any) -> Any:
    return x.numpy() if hasattr(x, "numpy") else x


def _detect(path: Path) -> str:
    if path.is_dir():
        if any(path.glob("router_trace_rank*.jsonl")):
            return "megatron"
        raise DataError(f"{path} is a directory without router_trace_rank*.jsonl: pass a routes file")
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth"):
        return "sglang-dump"
    if suffix in (".npy", ".npz"):
        return "vllm"
    if suffix in (".json", ".jsonl"):
        first = next((r for r in _json_records(path) if isinstance(r, Mapping)), {})
        if "top_indices" in first:
            return "megatron"
        if "meta_info" in first:
            return "sglang"
        return "vllm"
    raise DataError(f"cannot tell the format of {path.name}: pass format= one of {', '.join(FORMATS)}")


def load_routes(path: str | Path, format: RouteFormat = "auto", *, num_layers: int | None = None,
                top_k: int | None = None) -> RecordedRoutes:
    """Read one file (or a Megatron trace directory) of recorded routes (formats: module docstring).

    ``num_layers``/``top_k`` are needed for SGLang's flat ``routed_experts`` and ``top_k`` for a per-token
    dump of a model with k < 8. vLLM's -1 positions (prefix-cache hits) are left out and counted.
    """
    from ..validation import check_positive, check_type

    check_type(path, (str, os.PathLike), "path", "a path to a routes file (str or Path)")
    check_positive(num_layers, "num_layers", allow_none=True)
    check_positive(top_k, "top_k", allow_none=True)
    p = Path(path)
    if not p.exists():
        raise DataError(f"no routes file {p}: check the path")
    fmt = _detect(p) if format == "auto" else format
    if fmt not in FORMATS:
        raise ConfigError(f"format={format!r} is not one of auto, {', '.join(FORMATS)}")
    notes: list[str] = []
    where = p.name
    try:
        seqs, layers = _read(p, fmt, where, num_layers, top_k, notes)
    except (DataError, ConfigError):
        raise
    except Exception as exc:  # whatever a malformed file makes a reader raise: one line, never a traceback
        raise DataError(f"{where} cannot be read as {fmt} routes ({type(exc).__name__}: {_first(exc)}): check the "
                        "file and --routes-format") from None
    return _clean(RecordedRoutes(seqs, fmt, str(p), notes=notes, layers=layers), where)


def _read(p: Path, fmt: str, where: str, num_layers: int | None, top_k: int | None, notes: list[str]
          ) -> tuple[list[np.ndarray], list[int] | None]:
    """The sequences of one file in format ``fmt``, and the layer numbers when the format names them."""
    seqs: list[np.ndarray]
    if fmt == "megatron":
        files = sorted(p.glob("router_trace_rank*.jsonl")) if p.is_dir() else [p]
        return _megatron((r for f in files for r in _json_records(f)), where, notes)
    elif fmt == "sglang-dump":
        import torch

        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise DataError(f"{where} is not a torch.save dump ({type(exc).__name__}): pass the file that "
                            "/dump_expert_distribution_record wrote") from exc
        seqs = _sglang_dump(obj, where, top_k, notes)
    elif fmt == "sglang":
        found = [_sglang_record(r, f"{where} record {i}", num_layers, top_k)
                 for i, r in enumerate(_json_records(p), 1) if isinstance(r, Mapping)]
        seqs = [s for s in found if s is not None]
    elif p.suffix.lower() == ".npy":
        seqs = [a for a in [_vllm_array(np.load(p, allow_pickle=False), where)] if a is not None]
    elif p.suffix.lower() == ".npz":
        with np.load(p, allow_pickle=False) as z:
            seqs = [a for a in (_vllm_array(z[n], f"{where} array {n!r}") for n in z.files) if a is not None]
    else:
        records = _json_records(p)
        bad = next((i for i, r in enumerate(records, 1) if not isinstance(r, Mapping)), None)
        if bad is not None:
            raise DataError(f"{where} record {bad} is a JSON {type(records[bad - 1]).__name__}, not a response "
                            "object: pass the server's responses")
        seqs = [s for i, r in enumerate(records, 1) for s in _vllm_record(r, f"{where} record {i}")]
    return seqs, None


#: Engine quirks detected while reading, what each is, and the rule applied (counted in ``quirks``).
QUIRKS = {
    "constant_layer": "a layer whose every token has the same ids (all zeros, or one fixed set): a dense layer of a "
                      "hybrid model or a fused kernel that does not report routes; the layer is left out",
    "repeated_decode": "three or more consecutive tokens with identical routes at every layer, as CUDA-graph "
                       "replays duplicate generated tokens' routes; the run keeps its first row",
}

#: What a position whose every id is -1 means, by format (it is left out and counted).
MISSING = {"vllm": "vLLM prefix-cache hits, routed in an earlier request", "sglang": "unrecorded by SGLang",
           "sglang-dump": "unrecorded by SGLang"}


def _clean(rr: RecordedRoutes, where: str) -> RecordedRoutes:
    """Check the ids of every sequence and leave out missing positions, counting them.

    A position whose ids are all -1 is missing (:data:`MISSING` names why, per format); any other negative
    id, a -1 beside expert ids in one position, or an expert twice in one token's top-k at a layer is a
    one-line DataError naming the sequence and the position. All sequences share one (layers, k)."""
    if not rr.sequences:
        raise DataError(f"{where}: no routed experts found: was the server started with "
                        "--enable-return-routed-experts and the request made with routed experts on?")
    shapes = {s.shape[1:] for s in rr.sequences}
    if len(shapes) > 1:
        raise DataError(f"{where}: sequences have different (layers, k) {sorted(shapes)}: one model per file")
    _constant_layers(rr, where)
    kept = []
    for n, s in enumerate(rr.sequences):
        missing = (s == -1).all(axis=(1, 2))
        rest = s[~missing]
        if (rest < 0).any():
            t = int(np.flatnonzero((s < 0).any(axis=(1, 2)) & ~missing)[0])
            bad = int(s[t][s[t] < 0][0])
            what = "a -1 beside expert ids" if bad == -1 else f"expert id {bad}"
            raise DataError(f"{where}: sequence {n}, position {t} holds {what}: a position is either all -1 "
                            "(missing) or valid expert ids; check the file")
        if rest.shape[2] > 1:
            srt = np.sort(rest, axis=2)
            dup = (srt[:, :, 1:] == srt[:, :, :-1]).any(axis=2)
            if dup.any():
                t, la = (int(x) for x in np.argwhere(dup)[0])
                row = srt[t, la]
                twice = int(row[1:][row[1:] == row[:-1]][0])
                raise DataError(f"{where}: sequence {n}, position {t}: expert {twice} twice in the top-k at MoE "
                                f"layer {la}: an engine selects k distinct experts; check the file")
        rr.prefix_cached += int(missing.sum())
        if len(rest):
            kept.append(rest)
    if rr.prefix_cached:
        why = MISSING.get(rr.format, "missing")
        rr.notes.append(f"{rr.prefix_cached} positions marked -1 ({why}) left out")
    rr.sequences = [_drop_repeats(s, rr) for s in kept]
    for name, count in rr.quirks.items():
        if count:
            rr.notes.append(f"{name} ({count}): {QUIRKS[name]}")
    return rr


def _constant_layers(rr: RecordedRoutes, where: str) -> None:
    """Leave out the layers at which every recorded token of the file has the same ids (:data:`QUIRKS`), keeping
    the others' numbers; refuse a file where that leaves nothing."""
    L = rr.sequences[0].shape[1]
    stacked = np.concatenate([s[~(s == -1).all(axis=(1, 2))] for s in rr.sequences])
    if len(stacked) < 2:
        return
    constant = [la for la in range(L) if (stacked[:, la] == stacked[0, la]).all()]
    if not constant:
        return
    keep = [la for la in range(L) if la not in constant]
    if not keep:
        raise DataError(f"{where}: every layer has the same ids at every token: the engine reported no routes "
                        "(all zeros); check the server's routing capture")
    numbers = rr.layers if rr.layers is not None else list(range(L))
    rr.quirks["constant_layer"] = rr.quirks.get("constant_layer", 0) + len(constant)
    rr.sequences = [s[:, keep] for s in rr.sequences]
    rr.layers = [numbers[la] for la in keep]


def _drop_repeats(s: np.ndarray, rr: RecordedRoutes) -> np.ndarray:
    """``s`` without rows identical to the row before at every layer, in runs of 3 or more (two equal neighbours
    happen by chance on a small model; a run of three is the replay quirk); each dropped row is counted."""
    if len(s) < 3:
        return s
    same = (s[1:] == s[:-1]).all(axis=(1, 2))  # row i+1 repeats row i
    run = np.zeros(len(s), bool)
    for i in range(1, len(s) - 1):
        if same[i - 1] and same[i]:
            run[i] = run[i + 1] = True
    if not run.any():
        return s
    rr.quirks["repeated_decode"] = rr.quirks.get("repeated_decode", 0) + int(run.sum())
    return s[~run]


# ----- profiling -----------------------------------------------------------------------------------------
RouteInput = str | Path | np.ndarray | RecordedRoutes | Mapping[str, Any] | Sequence[Any]


def _as_recorded(value: RouteInput, name: str, num_layers: int | None, top_k: int | None) -> RecordedRoutes:
    if isinstance(value, RecordedRoutes):
        return value
    if isinstance(value, str | Path):
        return load_routes(value, num_layers=num_layers, top_k=top_k)
    if isinstance(value, np.ndarray):
        return _clean(RecordedRoutes([_checked_array(value, name)], "array"), name)
    if isinstance(value, Mapping):  # one request record
        return _clean(RecordedRoutes(_records([value], name, num_layers, top_k), "records"), name)
    items = list(value)
    if all(isinstance(x, Mapping) for x in items):
        return _clean(RecordedRoutes(_records(items, name, num_layers, top_k), "records"), name)
    if all(isinstance(x, str | Path) for x in items):
        parts = [load_routes(x, num_layers=num_layers, top_k=top_k) for x in items]
        shapes = {p.shape for p in parts}
        if len(shapes) > 1:
            raise DataError(f"domain {name!r}: its files have different (layers, k) {sorted(shapes)}")
        return RecordedRoutes([s for p in parts for s in p.sequences], "+".join(sorted({p.format for p in parts})),
                              ", ".join(p.source for p in parts), sum(p.prefix_cached for p in parts),
                              [n for p in parts for n in p.notes])
    return _clean(RecordedRoutes([_checked_array(np.asarray(x), name) for x in items], "arrays"), name)


def _checked_array(a: np.ndarray, name: str) -> np.ndarray:
    if a.ndim != 3:
        raise DataError(f"domain {name!r}: routes of shape {a.shape}, expected [tokens, moe_layers, k]")
    if not np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_:
        raise DataError(f"domain {name!r}: routes are {a.dtype}, not integer expert ids: pass the engine's expert "
                        "indices")
    return a.astype(np.int64)


def _records(items: Sequence[Mapping[str, Any]], name: str, num_layers: int | None, top_k: int | None
             ) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    for rec in items:
        meta = rec.get("meta_info")
        if isinstance(meta, Mapping) and "routed_experts" in meta:
            s = _sglang_record(rec, f"domain {name!r}", num_layers, top_k)
            out += [s] if s is not None else []
        else:
            out += _vllm_record(rec, f"domain {name!r}")
    return out


def profile_routes(
    routes: Mapping[str, RouteInput],
    num_experts: int,
    *,
    layers: Sequence[int] | None = None,
    num_layers: int | None = None,
    top_k: int | None = None,
    path_length: int | None = None,
) -> Any:
    """A :class:`~expertscope.stats.profile.RoutingProfile` from recorded routes, per domain.

    ``routes[name]``: arrays ``[tokens, L, k]`` (one per sequence, or a list of them), a file or list of
    files (:func:`load_routes`), or request records (vLLM / SGLang response dicts). ``num_experts`` is the
    model's routed-expert count; ``layers`` names the L MoE layers (default ``0..L-1``). Its ``to_frame()``
    has the same ``A``/lift columns as a hook profile; entropy, CWAS, gate weights and importance are NaN
    (``model_info["not_applicable"]`` says why), and co-activation, paths and per-token routes are filled.
    A file whose layer count or k differs from the others, or an expert id ≥ ``num_experts``, is a one-line
    DataError.
    """
    from ..data.types import check_domain_name, check_unique_names
    from ..stats.coactivation import resolve_path_length
    from ..stats.profile import STAT_NAMES, RoutingProfile
    from ..validation import check_positive, check_type

    check_type(routes, Mapping, "routes", "a mapping {domain: routes} (arrays, files or request records)")
    if not routes:
        raise DataError("no routes given: pass {domain: routes}")
    for name, value in routes.items():
        check_domain_name(name)
        check_type(value, (RecordedRoutes, str, os.PathLike, np.ndarray, Mapping, list, tuple), f"domain {name!r}: "
                   "its routes", "an array [tokens, layers, k], a file, or request records")
    check_unique_names(list(routes), "--routes")
    check_positive(num_experts, "num_experts")  # the model's routed-expert count: a whole number, never rounded
    check_positive(num_layers, "num_layers", allow_none=True)
    check_positive(top_k, "top_k", allow_none=True)
    check_positive(path_length, "path_length", allow_none=True)
    E = int(num_experts)
    loaded = {name: _as_recorded(v, name, num_layers, top_k) for name, v in routes.items()}
    shape = _common_shape(loaded)
    L, k = shape
    if top_k is not None and k != top_k:
        raise DataError(f"the routes hold k={k} experts per token but top_k={top_k} was given: check --top-k")
    if k > E:
        raise DataError(f"the routes hold k={k} experts per token but the model has {E} (--num-experts): k cannot "
                        "exceed the expert count; check --num-experts and the file")
    named = {tuple(rr.layers) for rr in loaded.values() if rr.layers is not None}
    if layers is None and len(named) > 1:
        raise DataError(f"the domains' traces number their layers differently {sorted(named)}: profile traces of "
                        "one model together")
    layer_ids = list(layers) if layers is not None else list(next(iter(named))) if named else list(range(L))
    if len(layer_ids) != L:
        raise DataError(f"{len(layer_ids)} layer names for routes with {L} MoE layers: pass {L} layers")
    if any(isinstance(x, bool) or not isinstance(x, int | np.integer) or x < 0 for x in layer_ids) \
            or len(set(layer_ids)) != L:
        raise ConfigError(f"layers={layer_ids} must be {L} distinct layer numbers >= 0: e.g. layers={list(range(L))}")
    recorded = {name: {"format": rr.format, "source": rr.source, "sequences": len(rr.sequences),
                       "tokens": rr.n_tokens, "prefix_cached": rr.prefix_cached, "notes": rr.notes,
                       "quirks": dict(rr.quirks)}
                for name, rr in loaded.items()}
    prof = RoutingProfile(
        layers=layer_ids, num_experts=E, top_k=k,
        model_info={"source": "recorded routes", "num_experts": E, "top_k": k, "num_shared_experts": {},
                    "not_applicable": NOT_APPLICABLE},
        config={"keep_routes": True, "path_length": resolve_path_length(path_length, L), "recorded": recorded},
    )
    for name, rr in loaded.items():
        bad = next((s for s in rr.sequences if s.size and s.max() >= E), None)
        if bad is not None:
            raise DataError(f"domain {name!r}: expert id {int(bad.max())} but --num-experts {E}: pass the "
                            "model's routed-expert count")
        if not rr.sequences:
            raise DataError(f"domain {name!r} has no routed tokens left (all {rr.prefix_cached} were prefix-cached)")
        n_tokens = np.array([len(s) for s in rr.sequences], np.int64)
        sel = np.stack([_selection_counts(s, E) for s in rr.sequences])
        stats = {"sel": sel, **{n: np.full(sel.shape, np.nan) for n in STAT_NAMES if n != "sel"}}
        prof.add(name, list(range(len(rr.sequences))), n_tokens, stats, [(s, -1) for s in rr.sequences])
    return prof


def _common_shape(loaded: Mapping[str, RecordedRoutes]) -> tuple[int, int]:
    for name, rr in loaded.items():
        inner = sorted({s.shape[1:] for s in rr.sequences})
        if len(inner) > 1:
            raise DataError(f"domain {name!r} mixes routes with (layers, k) {inner} ({rr.source}): every file must "
                            "come from the same model")
    shapes = {name: rr.shape for name, rr in loaded.items() if rr.sequences}
    if not shapes:
        raise DataError("no routed tokens in any domain: check the files")
    first_name, first = next(iter(shapes.items()))
    for name, s in shapes.items():
        if s != first:
            raise DataError(f"domain {name!r} has routes with {s[0]} layers and k={s[1]} but {first_name!r} has "
                            f"{first[0]} layers and k={first[1]}: profile routes of one model together")
    return first


def _selection_counts(routes: np.ndarray, num_experts: int) -> np.ndarray:
    """``(L, E)`` int64: how many tokens selected each expert at each layer."""
    L = routes.shape[1]
    out = np.zeros((L, num_experts), np.int64)
    for la in range(L):
        out[la] = np.bincount(routes[:, la].ravel(), minlength=num_experts)
    return out


__all__ = ["FORMATS", "MISSING", "NOT_APPLICABLE", "QUIRKS", "RecordedRoutes", "load_routes", "profile_routes"]
