"""Routes recorded by a serving or training engine: statistics from expert indices alone, no model in memory.

Formats (checked against the engines' own source; see docs/reference.md, "Routes recorded by vLLM, SGLang and
Megatron"):

- ``"vllm"`` — ``--enable-return-routed-experts``: ``prompt_routed_experts`` (request level) and
  ``routed_experts`` (per choice / ``CompletionOutput``), int16 ``[tokens, moe_layers, k]``; over HTTP as
  nested JSON lists or a base64 ``.npy``. Files: ``.npy`` (one sequence), ``.npz`` (one array per
  sequence), or ``.json``/``.jsonl`` response records. Prefix-cached positions are ``-1``: they are counted
  (``prefix_cached``) and left out. Prompt rows are phase ``prompt``, a choice's rows ``generated``; with
  several choices the prompt is counted once (with the first).
- ``"sglang"`` — ``--enable-return-routed-experts``: ``meta_info["routed_experts"]``, base64 int32,
  ``reshape(-1, L, k)``; a flat array, so ``num_layers`` and ``top_k`` must be given. ``prompt_tokens`` /
  ``completion_tokens`` give the phases and the expected route count.
- ``"sglang-dump"`` — ``--expert-distribution-recorder-mode per_token``: a ``torch.save`` file whose
  ``records`` hold ``input_ids``, ``positions``, ``forward_mode`` and ``topk_ids_of_layer [L, tokens, 8]``.
  The recorder assumes k = 8 (``_TOP_K_NUM = 8``): a model with a smaller k fills the other columns with -1
  (give ``top_k``); layers it never recorded (dense layers) are all -1 and are dropped;
  ``last_physical_to_logical_map`` (EPLB), when present, maps physical expert slots to experts. Extend
  (prefill, ``forward_mode`` 1) forwards are split into sequences where ``positions`` restarts at 0 and are
  phase ``prompt``; decode forwards (``forward_mode`` 2) are ``generated``.
- ``"megatron"`` — ``--moe-routing-trace-path DIR``: ``router_trace_rank{r}.jsonl``, one record per
  (step, router) with ``step``, ``block``, ``layer``, ``rank``, ``num_tokens``, ``topk``, ``top_indices``.
  A step's decoder routers form one group of tokens ``[num_tokens, L, k]``; MTP routers are left out.
  Training tokens have no phase.

Gate weights, when the engine returns them beside the ids (``routed_experts_weights``,
``prompt_routed_experts_weights``: same shape; base64 float32 for SGLang), give the gate-weight statistics.
Known engine quirks are detected, handled by one rule each and counted (:data:`QUIRKS`). Files are read
whole (:func:`load_routes`) or streamed in bounded memory (``profile_routes(..., stream=True)``: JSONL line by
line, ``.npy`` memory-mapped in chunks, Megatron step by step; a single JSON document and a ``torch.save``
dump are read whole).
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import ConfigError, DataError

RouteFormat = Literal["auto", "vllm", "sglang", "sglang-dump", "megatron"]
FORMATS = ("vllm", "sglang", "sglang-dump", "megatron")

#: Phase codes of a recorded token: read from the engine's fields (``UNLABELLED`` where a format has none).
PROMPT, GENERATED, UNLABELLED = 0, 1, -1
PHASES = {"prompt": PROMPT, "generated": GENERATED}

#: Rows per piece when a long array is streamed (``.npy`` files are memory-mapped and read in pieces).
CHUNK_TOKENS = 16_384

#: What cannot be computed from expert indices alone, and why.
NOT_APPLICABLE = {
    "entropy": "needs the router logits (recorded routes hold expert indices only)",
    "cwas": "needs the routing entropy, hence the router logits",
    "gate_mean": "needs the gate weights (these routes hold expert indices only)",
    "importance": "needs the expert outputs (no model in memory)",
    "ce": "needs the model: causal effects perturb its logits",
}

#: Engine quirks detected while reading, what each is, and the rule applied (counted in ``quirks``).
QUIRKS = {
    "constant_layer": "a layer whose every token has the same ids (all zeros, or one fixed set): a dense layer of a "
                      "hybrid model or a fused kernel that does not report routes; the layer is left out",
    "repeated_decode": "three or more consecutive generated (or unlabelled) tokens with identical routes at every "
                       "layer, as CUDA-graph replays duplicate generated tokens' routes; the run keeps its first row",
    "filled_255": "slots holding 255, the fill of SGLang's uint8 buffers (a uint8 array, or any array when the model "
                  "has at most 255 experts): read as unwritten (-1), then a whole position is missing and a slot "
                  "never written at any token is left out",
    "unwritten_slot": "a top-k slot that holds -1 at every token and layer (a buffer wider than k, e.g. shared "
                      "experts left out): the slot is left out",
    "one_short": "a request whose routes are one position short of its tokens (SGLang drops the last input token's "
                 "route in prefill-only requests): the routes are kept as the first positions",
    "stitched_overlap": "a request whose routes start with the whole previous request's (a server that ignores "
                        "routed_experts_start_len repeats the earlier turns): the repeated positions are left out",
}

#: What a position whose every id is -1 means, by format (it is left out and counted).
MISSING = {"vllm": "vLLM prefix-cache hits, routed in an earlier request", "sglang": "unrecorded by SGLang",
           "sglang-dump": "unrecorded by SGLang"}


@dataclass
class RecordedRoutes:
    """Sequences of recorded routes: each ``(T_i, L, k)`` int64, column 0 as the engine listed it.

    ``prefix_cached``: positions marked -1 (missing: vLLM prefix cache hits, unrecorded by SGLang) that were left
    out; ``notes``: the quirks met while reading, in words; ``phases[i]`` ``(T_i,)`` int8: :data:`PROMPT`,
    :data:`GENERATED` or :data:`UNLABELLED` per token; ``weights[i]`` ``(T_i, L, k)`` float64 gate weights when
    the engine returned them (else None).
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
    phases: list[np.ndarray] = field(default_factory=list)
    weights: list[np.ndarray] | None = None

    def __post_init__(self) -> None:
        if not self.phases:
            self.phases = [np.full(len(s), UNLABELLED, np.int8) for s in self.sequences]

    @property
    def shape(self) -> tuple[int, int]:
        """``(L, k)`` shared by every sequence."""
        return (self.sequences[0].shape[1], self.sequences[0].shape[2]) if self.sequences else (0, 0)

    @property
    def n_tokens(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    @classmethod
    def concat(cls, parts: Sequence[RecordedRoutes]) -> RecordedRoutes:
        """The sequences of several files of one domain, their counts and notes summed."""
        if len(parts) == 1:
            return parts[0]
        quirks: dict[str, int] = {}
        for p in parts:
            for q, n in p.quirks.items():
                quirks[q] = quirks.get(q, 0) + n
        weighted = all(p.weights is not None for p in parts)
        return cls([s for p in parts for s in p.sequences], "+".join(sorted({p.format for p in parts})),
                   ", ".join(p.source for p in parts), sum(p.prefix_cached for p in parts),
                   [n for p in parts for n in p.notes], parts[0].layers, quirks,
                   [ph for p in parts for ph in p.phases],
                   [w for p in parts for w in (p.weights or [])] if weighted else None)


@dataclass
class _Seq:
    """One sequence as read, before cleaning: ``routes`` ``(T, L, k)`` int64 (-1 = missing), ``phase`` ``(T,)``,
    ``weights`` ``(T, L, k)`` or None; ``request`` the record it came from (turns are compared between
    records); ``uint8``: the engine's buffer was uint8 (255 = unwritten); ``quirks`` met by the reader."""

    routes: np.ndarray
    phase: np.ndarray
    weights: np.ndarray | None
    request: int
    where: str
    uint8: bool = False
    quirks: dict[str, int] = field(default_factory=dict)

    def take(self, rows: Any) -> _Seq:
        """The same sequence restricted to ``rows`` (a mask or slice of positions)."""
        return _Seq(self.routes[rows], self.phase[rows], None if self.weights is None else self.weights[rows],
                    self.request, self.where, self.uint8, self.quirks)


def _seq(routes: np.ndarray, phase: int, request: int, where: str, uint8: bool = False,
         weights: np.ndarray | None = None) -> _Seq:
    return _Seq(routes, np.full(len(routes), phase, np.int8), weights, request, where, uint8)


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


def _vllm_array(value: Any, where: str) -> tuple[np.ndarray, bool] | None:
    """A vLLM routed-experts value (array, nested lists or base64 .npy) as ``(T, L, k)`` int64, and whether the
    engine's array was uint8 (255 = unwritten)."""
    if value is None:
        return None
    raw = _decode_npy_b64(value) if isinstance(value, str) else value
    uint8 = getattr(raw, "dtype", None) == np.uint8
    arr = _ids(raw, where, "routed experts")
    if arr.size == 0:
        return None
    if arr.ndim != 3:
        raise DataError(f"{where}: routed experts of shape {arr.shape}, expected [tokens, moe_layers, k]")
    return arr, uint8


def _weights(value: Any, shape: tuple[int, ...], where: str, flat: bool = False) -> np.ndarray | None:
    """Gate weights beside the ids (nested lists, a base64 .npy, or for SGLang base64 float32), as float64 of
    ``shape``; None when absent."""
    if value is None:
        return None
    try:
        if isinstance(value, str):
            arr = (np.frombuffer(base64.b64decode(value, validate=True), dtype=np.float32) if flat
                   else _decode_npy_b64(value))
        else:
            arr = np.asarray(value, dtype=np.float64)
        arr = np.asarray(arr, dtype=np.float64).reshape(shape)
    except (ValueError, TypeError, DataError):
        raise DataError(f"{where}: routed_experts_weights do not match the ids' shape {tuple(shape)}: pass the "
                        "weights the engine returned with these ids") from None
    if not np.isfinite(arr).all():
        raise DataError(f"{where}: routed_experts_weights hold a non-finite value: check the file")
    return arr


def _count_check(n: int, expected: set[int], short: int, where: str, what: str) -> dict[str, int]:
    """The quirks of a request whose ``n`` routes should number one of ``expected``: ``short`` (one fewer, the
    one-short quirk) is counted; any other count is a one-line DataError."""
    if n in expected:
        return {}
    if n == short:
        return {"one_short": 1}
    raise DataError(f"{where}: {n} routed positions for {what}: routes and tokens must match; check the file")


def _vllm_record(rec: Mapping[str, Any], where: str, request: int) -> list[_Seq]:
    """One vLLM response (HTTP JSON or an offline ``RequestOutput`` as a dict): the prompt's routes followed by
    the first choice's, then each further choice's own (the prompt counted once)."""
    prompt = _vllm_array(rec.get("prompt_routed_experts"), where)
    choices = rec.get("choices") or rec.get("outputs") or []
    if not isinstance(choices, list):
        raise DataError(f"{where}: 'choices' is a {type(choices).__name__}, not a list of completions: check the "
                        "response")
    outs = [(c, _vllm_array(c.get("routed_experts"), f"{where} choice {i}")) for i, c in enumerate(choices)
            if isinstance(c, Mapping)]
    if rec.get("routed_experts") is not None:
        outs.append((rec, _vllm_array(rec.get("routed_experts"), where)))
    parts = [(c, o) for c, o in outs if o is not None]
    quirks: dict[str, int] = {}
    pw = None
    if prompt is not None:
        pw = _weights(rec.get("prompt_routed_experts_weights"), prompt[0].shape, where)
        tokens = rec.get("prompt_token_ids")
        if isinstance(tokens, list):
            P = len(tokens)
            quirks = _count_check(len(prompt[0]), {P}, P - 1, where, f"{P} prompt tokens (prompt_token_ids)")
    if prompt is not None and any(o[0].shape[1:] != prompt[0].shape[1:] for _, o in parts):
        bad = next(o[0] for _, o in parts if o[0].shape[1:] != prompt[0].shape[1:])
        raise DataError(f"{where}: a completion's routes have (layers, k) {bad.shape[1:]} but the prompt's "
                        f"{prompt[0].shape[1:]}: one model per response")
    out: list[_Seq] = []
    for i, (c, (arr, uint8)) in enumerate(parts):
        w = _weights(c.get("routed_experts_weights"), arr.shape, f"{where} choice {i}")
        s = _seq(arr, GENERATED, request, where, uint8, w)
        if i == 0 and prompt is not None:
            p = _seq(prompt[0], PROMPT, request, where, prompt[1], pw)
            s = _Seq(np.concatenate([p.routes, s.routes]), np.concatenate([p.phase, s.phase]),
                     np.concatenate([pw, w]) if pw is not None and w is not None else None, request, where,
                     prompt[1] or uint8)
        out.append(s)
    if not out and prompt is not None:
        out.append(_seq(prompt[0], PROMPT, request, where, prompt[1], pw))
    if out:
        out[0].quirks = quirks
    return out


def _sglang_record(rec: Mapping[str, Any], where: str, request: int, num_layers: int | None,
                   top_k: int | None) -> _Seq | None:
    """One SGLang response: ``meta_info["routed_experts"]`` reshaped to ``(T, L, k)``, phases from
    ``prompt_tokens`` / ``completion_tokens`` when given."""
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
    routes = flat.reshape(-1, num_layers, top_k).astype(np.int64)
    weights = _weights(meta.get("routed_experts_weights"), routes.shape, where, flat=True)
    phase = np.full(len(routes), UNLABELLED, np.int8)
    quirks: dict[str, int] = {}
    P, C = meta.get("prompt_tokens"), meta.get("completion_tokens", 0)
    if isinstance(P, int) and not isinstance(P, bool) and P >= 0:
        C = C if isinstance(C, int) and not isinstance(C, bool) and C > 0 else 0
        # the last generated token is never forwarded, so its route may be absent (both counts are normal)
        expected = {P + C, P + C - 1} if C else {P}
        quirks = _count_check(len(routes), expected, P - 1 if not C else -1, where,
                              f"{P} prompt and {C} completion tokens (meta_info)")
        phase[:] = GENERATED
        phase[:min(P, len(routes))] = PROMPT
    s = _Seq(routes, phase, weights, request, where)
    s.quirks = quirks
    return s


def _iter_json(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line number, record)`` of a JSONL file, read line by line; a file that is one JSON document (a list of
    records or one object, over any number of lines) is read whole and its records numbered from 1."""
    try:
        with path.open("r", encoding="utf-8") as fh:
            first = ""
            for first in fh:
                if first.strip():
                    break
            try:
                head = json.loads(first) if first.strip() else None
            except json.JSONDecodeError:
                head = None
                whole = first + fh.read()
                try:
                    data = json.loads(whole)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:1 is not JSON ({exc.msg}): pass a JSON or JSONL file") from None
                yield from enumerate(data if isinstance(data, list) else [data], 1)
                return
            if head is None:
                return
            lines = ((n, line) for n, line in enumerate(fh, 2) if line.strip())
            second = next(lines, None)
            if isinstance(head, list) and second is None:
                yield from enumerate(head, 1)  # one line holding a list of records
                return
            yield 1, head
            if second is not None:
                yield second[0], _json_line(path, *second)
            for n, line in lines:
                yield n, _json_line(path, n, line)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path.name} is not UTF-8 text (byte {exc.start}): pass the engine's JSON or JSONL "
                        "output, or the right --routes-format for a binary file") from None


def _json_line(path: Path, n: int, line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{n} is not JSON ({exc.msg}): pass a JSON or JSONL file") from None


def _megatron(records: Iterable[tuple[str, Any]], where: str, notes: list[str], meta: dict[str, Any]
              ) -> Iterator[_Seq]:
    """The sequences of a Megatron router trace, ``(T, L, k)`` per (rank, step), in trace order, one step held
    at a time; ``meta["layers"]`` receives the layer numbers as the trace gives them. ``records`` are
    ``(location, record)``; a step's records must be consecutive within a rank's file."""
    skipped = 0
    ranks: set[int] = set()
    done: set[tuple[int, int]] = set()
    key: tuple[int, int] | None = None
    layers: dict[int, np.ndarray] = {}
    numbers: list[int] | None = None

    def emit() -> _Seq:
        assert key is not None
        counts = {v.shape[0] for v in layers.values()}
        if len(counts) != 1:
            raise DataError(f"{where}: step {key[1]} of rank {key[0]} has layers with different token counts")
        nonlocal numbers
        if numbers is None:
            numbers = meta["layers"] = sorted(layers)
            if numbers != list(range(numbers[0], numbers[0] + len(numbers))):
                notes.append(f"layers {numbers} as the trace numbers them (not consecutive: the others are dense or "
                             "not traced)")
        if sorted(layers) != numbers:
            raise DataError(f"{where}: step {key[1]} of rank {key[0]} has layers {sorted(layers)}, others "
                            f"{numbers}: pass whole traces")
        done.add(key)
        routes = np.stack([layers[la] for la in numbers], axis=1)
        return _seq(routes, UNLABELLED, len(done), f"{where} step {key[1]} rank {key[0]}")

    for at, rec in records:
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
        ranks.add(rank)
        if (rank, step) != key:
            if key is not None:
                yield emit()
            if (rank, step) in done:
                raise DataError(f"{at}: step {step} of rank {rank} appears again after other steps: pass the trace "
                                "as Megatron wrote it (one step's routers together)")
            key, layers = (rank, step), {}
        if layer in layers:
            raise DataError(f"{where}: layer {layer} appears twice in step {step} of rank {rank}: pass one trace "
                            "per run")
        layers[layer] = flat.reshape(num_tokens, topk)
    if key is not None:
        yield emit()
    if skipped:
        notes.append(f"{skipped} MTP router records left out (only decoder layers are profiled)")
    if len(ranks) > 1:
        notes.append("several ranks read: with tensor parallelism ranks repeat the same tokens, so pass one "
                     "rank's file unless ranks saw different data")


def _forward_phase(mode: Any) -> int:
    """SGLang's ``ForwardMode`` (an int, or its name) as a phase: EXTEND (1) is the prompt, DECODE (2) generated."""
    mode = getattr(mode, "name", mode)
    if isinstance(mode, str):
        return {"EXTEND": PROMPT, "DECODE": GENERATED}.get(mode.upper(), UNLABELLED)
    try:
        return {1: PROMPT, 2: GENERATED}.get(int(mode), UNLABELLED)
    except (TypeError, ValueError):
        return UNLABELLED


def _sglang_dump(obj: Any, where: str, top_k: int | None, notes: list[str]) -> list[_Seq]:
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
    pieces: list[tuple[np.ndarray, int, int, str]] = []  # (ids [L, T, k], phase, record, where)
    for n, rec in enumerate(records):
        if not isinstance(rec, Mapping) or "topk_ids_of_layer" not in rec:
            raise DataError(f"{where}: record {n} has no topk_ids_of_layer: pass SGLang's per-token dump")
        at = f"{where} record {n}"
        ids = _ids(_to_numpy(rec["topk_ids_of_layer"]), at, "topk_ids_of_layer")  # [L, T, 8]
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
        phase = _forward_phase(rec.get("forward_mode"))
        positions = np.asarray(_to_numpy(rec.get("positions", np.arange(T))), dtype=np.int64)[:T]
        starts = [i for i in range(T) if positions[i] == 0] if phase != GENERATED else []
        if not starts or starts[0] != 0:
            starts = [0, *starts]
        pieces += [(ids[:, a:b], phase, n, at) for a, b in zip(starts, [*starts[1:], T], strict=True) if b > a]
    # layers the recorder never wrote (dense layers) are -1 at every token of the dump
    L = pieces[0][0].shape[0] if pieces else 0
    unrecorded = [la for la in range(L) if all((p[0][la] == -1).all() for p in pieces)]
    keep = [la for la in range(L) if la not in unrecorded]
    if top_k is not None and top_k < 8:
        notes.append(f"SGLang's per-token dump assumes k = 8: the first {top_k} columns are used")
    if unrecorded:
        notes.append(f"dump layers {unrecorded} were never recorded (dense layers): left out")
    return [_seq(ids[keep].transpose(1, 0, 2), phase, n, at) for ids, phase, n, at in pieces]


def _npy_pieces(p: Path, chunk: int) -> Iterator[np.ndarray]:
    """A C-ordered ``.npy`` array read ``chunk`` rows at a time with plain reads (a memory map would count the
    whole file in the process's resident memory as it is read); other arrays are read whole."""
    with p.open("rb") as fh:
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(fh)  # the header only: never unpickles
        if dtype.hasobject:
            raise DataError(f"{p.name} holds Python objects, not expert ids: pass the engine's int array")
        if fortran or len(shape) != 3:
            yield np.load(p, allow_pickle=False)
            return
        row = int(np.prod(shape[1:])) * dtype.itemsize
        for a in range(0, shape[0], chunk):
            n = min(chunk, shape[0] - a)
            buf = fh.read(n * row)
            if len(buf) != n * row:
                raise DataError(f"{p.name} ends after {a + len(buf) // max(row, 1)} of {shape[0]} rows: the file is "
                                "truncated; copy it again")
            yield np.frombuffer(buf, dtype=dtype).reshape(n, *shape[1:])


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
        first = next((r for _, r in _iter_json(path) if isinstance(r, Mapping)), {})
        if "top_indices" in first:
            return "megatron"
        if "meta_info" in first:
            return "sglang"
        return "vllm"
    raise DataError(f"cannot tell the format of {path.name}: pass format= one of {', '.join(FORMATS)}")


def _read(p: Path, fmt: str, where: str, num_layers: int | None, top_k: int | None, notes: list[str],
          meta: dict[str, Any], chunk: int | None = None) -> Iterator[_Seq]:
    """The sequences of one file in format ``fmt`` as read (uncleaned), lazily where the format allows; with
    ``chunk``, a long ``.npy`` array is memory-mapped and yielded in pieces of ``chunk`` rows (one request)."""
    if fmt == "megatron":
        files = sorted(p.glob("router_trace_rank*.jsonl")) if p.is_dir() else [p]
        yield from _megatron(((f"{where} line {n}" if not p.is_dir() else f"{f.name} line {n}", r)
                              for f in files for n, r in _iter_json(f)), where, notes, meta)
    elif fmt == "sglang-dump":
        import torch

        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise DataError(f"{where} is not a torch.save dump ({type(exc).__name__}): pass the file that "
                            "/dump_expert_distribution_record wrote") from exc
        yield from _sglang_dump(obj, where, top_k, notes)
    elif fmt == "sglang":
        for i, r in _iter_json(p):
            if isinstance(r, Mapping):
                s = _sglang_record(r, f"{where} record {i}", i, num_layers, top_k)
                if s is not None:
                    yield s
    elif p.suffix.lower() == ".npy":
        if chunk:
            for piece in _npy_pieces(p, chunk):
                got = _vllm_array(piece, where)
                if got is not None:
                    yield _seq(got[0], UNLABELLED, 1, where, got[1])
            return
        got = _vllm_array(np.load(p, allow_pickle=False), where)
        if got is not None:
            yield _seq(got[0], UNLABELLED, 1, where, got[1])
    elif p.suffix.lower() == ".npz":
        with np.load(p, allow_pickle=False) as z:
            for i, name in enumerate(z.files, 1):
                got = _vllm_array(z[name], f"{where} array {name!r}")
                if got is not None:
                    yield _seq(got[0], UNLABELLED, i, f"{where} array {name!r}", got[1])
    else:
        for i, r in _iter_json(p):
            if not isinstance(r, Mapping):
                raise DataError(f"{where} record {i} is a JSON {type(r).__name__}, not a response object: pass the "
                                "server's responses")
            yield from _vllm_record(r, f"{where} record {i}", i)


def _k_above(k: int, E: int) -> str:
    return (f"the routes hold k={k} experts per token but the model has {E} (--num-experts): k cannot exceed the "
            "expert count; check --num-experts and the file")


# ----- cleaning ------------------------------------------------------------------------------------------
class _Cleaner:
    """The rules applied to every sequence of one file, in two passes: :meth:`scan` sees every sequence first
    (the layers constant at every token and the slots never written are properties of the whole file), then
    :meth:`clean` checks each one and leaves out what the rules say (:data:`QUIRKS`, :data:`MISSING`), counting
    it. Both passes hold one sequence at a time, so a file can be streamed twice instead of held."""

    def __init__(self, fmt: str, where: str, num_experts: int | None, meta: dict[str, Any]) -> None:
        self.fmt, self.where, self.E = fmt, where, num_experts
        self.meta = meta  # the reader's: "layers" (numbers as the engine gave them) once the first pass is done
        self.numbers: list[int] | None = None
        self.quirks: dict[str, int] = {}
        self.missing = 0
        self.weighted: bool | None = None
        self._shape: tuple[int, ...] | None = None
        self._ref: np.ndarray | None = None
        self._constant: np.ndarray | None = None
        self._unwritten: np.ndarray | None = None
        self._rows = 0
        self.keep_layers: list[int] = []
        self.keep_slots: list[int] = []
        self._request: int | None = None
        self._previous: np.ndarray | None = None

    def _count(self, name: str, n: int) -> None:
        if n:
            self.quirks[name] = self.quirks.get(name, 0) + int(n)

    def _filled(self, s: _Seq, count: bool) -> np.ndarray:
        r = s.routes
        if s.uint8 or (self.E is not None and self.E <= 255):
            hit = r == 255
            if hit.any():
                if count:
                    self._count("filled_255", int(hit.sum()))
                r = np.where(hit, -1, r)
        return r

    # ----- pass 1
    def scan(self, s: _Seq) -> None:
        r = self._filled(s, False)
        if self._shape is None:
            self._shape = r.shape[1:]
        elif r.shape[1:] != self._shape:
            raise DataError(f"{self.where}: sequences have different (layers, k) {sorted({self._shape, r.shape[1:]})}: "
                            "one model per file")
        weighted = s.weights is not None
        if self.weighted is None:
            self.weighted = weighted
        elif self.weighted != weighted:
            raise DataError(f"{s.where}: some records have routed_experts_weights and others not: pass records of "
                            "one server setting")
        rows = r[~(r == -1).all(axis=(1, 2))]
        if not len(rows):
            return
        if self._ref is None:
            self._ref = rows[0].copy()
            self._constant = np.ones(r.shape[1], bool)
            self._unwritten = np.ones(r.shape[2], bool)
        assert self._constant is not None and self._unwritten is not None
        self._constant &= (rows == self._ref).all(axis=(0, 2))
        self._unwritten &= (rows == -1).all(axis=(0, 1))
        self._rows += len(rows)

    def finish_scan(self) -> None:
        if self._shape is None:
            raise DataError(f"{self.where}: no routed experts found: was the server started with "
                            "--enable-return-routed-experts and the request made with routed experts on?")
        L, k = self._shape
        constant = [] if self._rows < 2 or self._constant is None else [int(x) for x in np.flatnonzero(self._constant)]
        unwritten = [] if self._unwritten is None else [int(x) for x in np.flatnonzero(self._unwritten)]
        self.keep_layers = [la for la in range(L) if la not in constant]
        self.keep_slots = [c for c in range(k) if c not in unwritten]
        if constant and not self.keep_layers:
            raise DataError(f"{self.where}: every layer has the same ids at every token: the engine reported no "
                            "routes (all zeros); check the server's routing capture")
        if self.E is not None and len(self.keep_slots) > self.E:
            raise DataError(_k_above(len(self.keep_slots), self.E))
        self._count("constant_layer", len(constant))
        self._count("unwritten_slot", len(unwritten))
        given = self.meta.get("layers")
        numbers = given if given is not None else list(range(L))
        self.numbers = [numbers[la] for la in self.keep_layers] if constant or given is not None else None

    # ----- pass 2
    def clean(self, s: _Seq) -> _Seq | None:
        """``s`` checked, with the rules applied; None when no position is left."""
        for q, n in s.quirks.items():
            self._count(q, n)
        r = self._filled(s, True)
        if len(self.keep_slots) != r.shape[2]:
            r = r[:, :, self.keep_slots]
            s = _Seq(r, s.phase, None if s.weights is None else s.weights[:, :, self.keep_slots], s.request, s.where)
        else:
            s = _Seq(r, s.phase, s.weights, s.request, s.where)
        if s.request != self._request:  # a new request: does it repeat the whole previous one first?
            prev, self._previous, self._request = self._previous, r, s.request
            if prev is not None and 2 <= len(prev) < len(r) and np.array_equal(r[:len(prev)], prev):
                self._count("stitched_overlap", len(prev))
                s = s.take(slice(len(prev), None))
        if len(self.keep_layers) != s.routes.shape[1]:
            s = _Seq(s.routes[:, self.keep_layers], s.phase,
                     None if s.weights is None else s.weights[:, self.keep_layers], s.request, s.where)
        missing = (s.routes == -1).all(axis=(1, 2))
        if missing.any():
            self.missing += int(missing.sum())
            s = s.take(~missing)
        self._check(s)
        s = self._drop_repeats(s)
        return s if len(s.routes) else None

    def _check(self, s: _Seq) -> None:
        """A negative id (other than a whole missing position) or an expert twice in one token's top-k at a
        layer is a one-line DataError naming the sequence and position."""
        rest = s.routes
        if (rest < 0).any():
            t = int(np.flatnonzero((rest < 0).any(axis=(1, 2)))[0])
            bad = int(rest[t][rest[t] < 0][0])
            what = "a -1 (missing or unwritten, as is 255 from a uint8 buffer) beside expert ids" if bad == -1 \
                else f"expert id {bad}"
            raise DataError(f"{s.where}, position {t} holds {what}: a position is either all -1 (missing) or valid "
                            "expert ids; check the file")
        if rest.shape[2] > 1 and len(rest):
            srt = np.sort(rest, axis=2)
            dup = (srt[:, :, 1:] == srt[:, :, :-1]).any(axis=2)
            if dup.any():
                t, la = (int(x) for x in np.argwhere(dup)[0])
                row = srt[t, la]
                twice = int(row[1:][row[1:] == row[:-1]][0])
                raise DataError(f"{s.where}, position {t}: expert {twice} twice in the top-k at MoE layer {la}: an "
                                "engine selects k distinct experts; check the file")
        if self.E is not None and rest.size and rest.max() >= self.E:
            raise DataError(f"{s.where}: expert id {int(rest.max())} but --num-experts {self.E}: pass the model's "
                            "routed-expert count")

    def _drop_repeats(self, s: _Seq) -> _Seq:
        """``s`` without rows identical to the row before at every layer, in runs of 3 or more of generated or
        unlabelled tokens (two equal neighbours happen by chance on a small model; a run of three is the replay
        quirk; prompt tokens are never replayed); each dropped row is counted."""
        r = s.routes
        if len(r) < 3:
            return s
        same = (r[1:] == r[:-1]).all(axis=(1, 2)) & (s.phase[1:] != PROMPT) & (s.phase[:-1] != PROMPT)
        run = np.zeros(len(r), bool)
        middle = same[:-1] & same[1:]  # rows i-1, i, i+1 equal
        idx = np.flatnonzero(middle) + 1
        run[idx] = True
        run[idx + 1] = True
        if not run.any():
            return s
        self._count("repeated_decode", int(run.sum()))
        return s.take(~run)

    def notes(self) -> list[str]:
        out = []
        if self.missing:
            out.append(f"{self.missing} positions marked -1 ({MISSING.get(self.fmt, 'missing')}) left out")
        out += [f"{name} ({count}): {QUIRKS[name]}" for name, count in self.quirks.items() if count]
        return out


def _cleaned(seqs: Iterable[_Seq], fmt: str, where: str, num_experts: int | None, meta: dict[str, Any],
             rescan: Callable[[], Iterable[_Seq]] | None = None) -> tuple[_Cleaner, Iterator[_Seq]]:
    """The cleaner of one file after its first pass over ``seqs``, and the cleaned sequences: from ``rescan()``
    (a second read of the file: streaming) or from ``seqs`` held in memory."""
    held = None if rescan is not None else list(seqs)
    cleaner = _Cleaner(fmt, where, num_experts, meta)
    for s in (seqs if held is None else held):
        cleaner.scan(s)
    cleaner.finish_scan()
    source = held if held is not None else rescan()  # type: ignore[misc]
    return cleaner, (c for c in (cleaner.clean(s) for s in source) if c is not None)


def _opened(path: str | Path, format: str, num_layers: int | None, top_k: int | None
            ) -> tuple[Path, str, str]:
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
    return p, fmt, p.name


def _guarded(it: Iterable[_Seq], where: str, fmt: str) -> Iterator[_Seq]:
    """``it``, with whatever a malformed file makes a reader raise turned into one line (never a traceback)."""
    try:
        yield from it
    except (DataError, ConfigError):
        raise
    except Exception as exc:
        raise DataError(f"{where} cannot be read as {fmt} routes ({type(exc).__name__}: {_first(exc)}): check the "
                        "file and --routes-format") from None


def load_routes(path: str | Path, format: RouteFormat = "auto", *, num_layers: int | None = None,
                top_k: int | None = None, num_experts: int | None = None) -> RecordedRoutes:
    """Read one file (or a Megatron trace directory) of recorded routes (formats: module docstring).

    ``num_layers``/``top_k`` are needed for SGLang's flat ``routed_experts`` and ``top_k`` for a per-token
    dump of a model with k < 8. Missing positions (-1: vLLM prefix-cache hits, unrecorded by SGLang) are left out
    and counted; ``num_experts`` (optional) checks the ids and reads 255 as unwritten when it is at most 255.
    """
    from ..validation import check_positive

    check_positive(num_experts, "num_experts", allow_none=True)
    p, fmt, where = _opened(path, format, num_layers, top_k)
    notes: list[str] = []
    meta: dict[str, Any] = {}
    seqs = list(_guarded(_read(p, fmt, where, num_layers, top_k, notes, meta), where, fmt))
    if not seqs:
        raise DataError(f"{where}: no routed experts found: was the server started with "
                        "--enable-return-routed-experts and the request made with routed experts on?")
    cleaner, cleaned = _cleaned(seqs, fmt, where, num_experts, meta)
    kept = list(cleaned)
    weights = [s.weights for s in kept] if cleaner.weighted and kept else None
    return RecordedRoutes([s.routes for s in kept], fmt, str(p), cleaner.missing, notes + cleaner.notes(),
                          cleaner.numbers, dict(cleaner.quirks), [s.phase for s in kept], weights)  # type: ignore[arg-type]


def _stream_routes(path: str | Path, format: str, num_layers: int | None, top_k: int | None,
                   num_experts: int | None, chunk: int | None = None) -> tuple[_Cleaner, list[str], Iterator[_Seq]]:
    """One file streamed twice (a scan, then the cleaned sequences), one sequence (or ``chunk`` rows of a long
    array) in memory at a time. The cleaner's counts and the notes are complete once the iterator is spent."""
    p, fmt, where = _opened(path, format, num_layers, top_k)
    notes: list[str] = []
    meta: dict[str, Any] = {}

    def read(into: list[str]) -> Iterator[_Seq]:
        return _guarded(_read(p, fmt, where, num_layers, top_k, into, meta, chunk or CHUNK_TOKENS), where, fmt)

    cleaner, cleaned = _cleaned(read([]), fmt, where, num_experts, meta, rescan=lambda: read(notes))
    return cleaner, notes, cleaned


# ----- profiling -----------------------------------------------------------------------------------------
RouteInput = str | Path | np.ndarray | RecordedRoutes | Mapping[str, Any] | Sequence[Any]


def _in_memory(seqs: list[_Seq], fmt: str, name: str, num_experts: int | None) -> RecordedRoutes:
    where = f"domain {name!r}"
    if not seqs:
        raise DataError(f"{where}: no routed experts found: was the server started with "
                        "--enable-return-routed-experts and the request made with routed experts on?")
    cleaner, cleaned = _cleaned(seqs, fmt, where, num_experts, {})
    kept = list(cleaned)
    return RecordedRoutes([s.routes for s in kept], fmt, "", cleaner.missing, cleaner.notes(), cleaner.numbers,
                          dict(cleaner.quirks), [s.phase for s in kept],
                          [s.weights for s in kept] if cleaner.weighted else None)  # type: ignore[misc]


def _as_recorded(value: RouteInput, name: str, num_layers: int | None, top_k: int | None,
                 num_experts: int | None, format: RouteFormat = "auto") -> RecordedRoutes:
    """``value`` (any :data:`RouteInput`) read whole and cleaned; files in ``format``."""
    if isinstance(value, RecordedRoutes):
        return value
    where = f"domain {name!r}"
    if isinstance(value, str | os.PathLike):
        return load_routes(value, format, num_layers=num_layers, top_k=top_k, num_experts=num_experts)
    if isinstance(value, np.ndarray):
        return _in_memory([_seq(_checked_array(value, name), UNLABELLED, 1, where, value.dtype == np.uint8)],
                          "array", name, num_experts)
    if isinstance(value, Mapping):  # one request record
        return _in_memory(_records([value], name, num_layers, top_k), "records", name, num_experts)
    items = list(value)
    if all(isinstance(x, Mapping) for x in items):
        return _in_memory(_records(items, name, num_layers, top_k), "records", name, num_experts)
    if all(isinstance(x, str | os.PathLike) for x in items):
        parts = [load_routes(x, format, num_layers=num_layers, top_k=top_k, num_experts=num_experts) for x in items]
        shapes = {p.shape for p in parts}
        if len(shapes) > 1:
            raise DataError(f"domain {name!r}: its files have different (layers, k) {sorted(shapes)}")
        return RecordedRoutes.concat(parts)
    arrays = [np.asarray(x) for x in items]
    return _in_memory([_seq(_checked_array(a, name), UNLABELLED, i, f"{where} array {i}", a.dtype == np.uint8)
                       for i, a in enumerate(arrays, 1)], "arrays", name, num_experts)


def _checked_array(a: np.ndarray, name: str) -> np.ndarray:
    if a.ndim != 3:
        raise DataError(f"domain {name!r}: routes of shape {a.shape}, expected [tokens, moe_layers, k]")
    if not np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_:
        raise DataError(f"domain {name!r}: routes are {a.dtype}, not integer expert ids: pass the engine's expert "
                        "indices")
    return a.astype(np.int64)


def _records(items: Sequence[Mapping[str, Any]], name: str, num_layers: int | None, top_k: int | None
             ) -> list[_Seq]:
    out: list[_Seq] = []
    for i, rec in enumerate(items, 1):
        where = f"domain {name!r} record {i}"
        meta = rec.get("meta_info")
        if isinstance(meta, Mapping) and "routed_experts" in meta:
            s = _sglang_record(rec, where, i, num_layers, top_k)
            out += [s] if s is not None else []
        else:
            out += _vllm_record(rec, where, i)
    return out


@dataclass
class _Domain:
    """One domain's routes as the profile reads them: ``sequences()`` yields ``(routes, phase, weights)``;
    ``record()`` says what was read (complete once the sequences are spent)."""

    shape: tuple[int, int]
    numbers: list[int] | None
    weighted: bool
    sequences: Callable[[], Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]]
    record: Callable[[], dict[str, Any]]


def _held(rr: RecordedRoutes) -> _Domain:
    def seqs() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        for i, s in enumerate(rr.sequences):
            yield s, rr.phases[i], rr.weights[i] if rr.weights is not None else None

    def record() -> dict[str, Any]:
        return {"format": rr.format, "source": rr.source, "sequences": len(rr.sequences), "tokens": rr.n_tokens,
                "prefix_cached": rr.prefix_cached, "notes": list(rr.notes), "quirks": dict(rr.quirks)}

    return _Domain(rr.shape, rr.layers, rr.weights is not None, seqs, record)


def _streamed(files: Sequence[str | Path], name: str, format: str, num_layers: int | None, top_k: int | None,
              num_experts: int) -> _Domain:
    """A domain read from ``files`` in bounded memory (each scanned once now, read again while profiling)."""
    opened = [_stream_routes(f, format, num_layers, top_k, num_experts) for f in files]
    shapes = {(len(c.keep_layers), len(c.keep_slots)) for c, _, _ in opened}
    if len(shapes) > 1:
        raise DataError(f"domain {name!r}: its files have different (layers, k) {sorted(shapes)}")
    numbers = {tuple(c.numbers) for c, _, _ in opened if c.numbers is not None}
    if len(numbers) > 1:
        raise DataError(f"domain {name!r}: its files number their layers differently {sorted(numbers)}")
    weighted = {bool(c.weighted) for c, _, _ in opened}
    count = {"sequences": 0, "tokens": 0}

    def seqs() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        for _, _, it in opened:
            for s in it:
                count["sequences"] += 1
                count["tokens"] += len(s.routes)
                yield s.routes, s.phase, s.weights if len(weighted) == 1 and True in weighted else None

    def record() -> dict[str, Any]:
        quirks: dict[str, int] = {}
        for c, _, _ in opened:
            for q, n in c.quirks.items():
                quirks[q] = quirks.get(q, 0) + n
        fmts = sorted({c.fmt for c, _, _ in opened})
        return {"format": "+".join(fmts), "source": ", ".join(str(f) for f in files), **count,
                "prefix_cached": sum(c.missing for c, _, _ in opened),
                "notes": [n for c, notes, _ in opened for n in notes + c.notes()], "quirks": quirks, "streamed": True}

    return _Domain(next(iter(shapes)), list(next(iter(numbers))) if numbers else None, weighted == {True}, seqs,
                   record)


def _sequence_stats(routes: np.ndarray, weights: np.ndarray | None, E: int) -> dict[str, np.ndarray]:
    """``(L, E)`` per statistic of one sequence's routes: selections, gate-weight sums (NaN without weights), the
    rest NaN (they need the logits or the model)."""
    from ..stats.profile import STAT_NAMES

    sel = _selection_counts(routes, E)
    out = {n: np.full(sel.shape, np.nan) for n in STAT_NAMES if n != "sel"}
    out["sel"] = sel
    if weights is not None:
        out["gate"] = np.stack([np.bincount(routes[:, la].ravel(), weights=weights[:, la].ravel(), minlength=E)
                                for la in range(routes.shape[1])])
    return out


def profile_routes(
    routes: Mapping[str, RouteInput],
    num_experts: int,
    *,
    layers: Sequence[int] | None = None,
    num_layers: int | None = None,
    top_k: int | None = None,
    path_length: int | None = None,
    format: RouteFormat = "auto",
    stream: bool = False,
) -> Any:
    """A :class:`~expertscope.stats.profile.RoutingProfile` from recorded routes, per domain.

    ``routes[name]``: arrays ``[tokens, L, k]`` (one per sequence, or a list of them), a file or list of
    files (:func:`load_routes`), or request records (vLLM / SGLang response dicts). ``num_experts`` is the
    model's routed-expert count; ``layers`` names the L MoE layers (default ``0..L-1``). Its ``to_frame()``
    has the same ``A``/lift columns as a hook profile; entropy, CWAS and importance are NaN, and so are gate
    weights unless the engine returned them (``model_info["not_applicable"]`` says why); co-activation, paths
    and, unless streamed, per-token routes are filled. When the engine labels tokens prompt or generated,
    ``profile.phases`` holds one profile per phase (the same statistics over that phase's tokens).

    ``stream=True`` reads files in bounded memory (twice: a scan, then the statistics) and keeps domain totals
    only (``keep_sequences=False``): the counts equal those of the in-memory read. A file whose layer count or k
    differs from the others, or an expert id ≥ ``num_experts``, is a one-line DataError.
    """
    from ..data.types import check_domain_name, check_unique_names
    from ..stats.coactivation import resolve_path_length
    from ..stats.profile import RoutingProfile
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
    if format != "auto" and format not in FORMATS:
        raise ConfigError(f"format={format!r} is not one of auto, {', '.join(FORMATS)}")
    E = int(num_experts)
    domains: dict[str, _Domain] = {}
    for name, value in routes.items():
        files = [value] if isinstance(value, str | os.PathLike) else list(value) if isinstance(value, list | tuple) \
            and value and all(isinstance(x, str | os.PathLike) for x in value) else None
        if stream and files is not None:
            domains[name] = _streamed(files, name, format, num_layers, top_k, E)
        else:
            domains[name] = _held(_as_recorded(value, name, num_layers, top_k, E, format))
    L, k = _common_shape(domains)
    if top_k is not None and k != top_k:
        raise DataError(f"the routes hold k={k} experts per token but top_k={top_k} was given: check --top-k")
    if k > E:
        raise DataError(_k_above(k, E))
    named = {tuple(d.numbers) for d in domains.values() if d.numbers is not None}
    if layers is None and len(named) > 1:
        raise DataError(f"the domains' traces number their layers differently {sorted(named)}: profile traces of "
                        "one model together")
    layer_ids = list(layers) if layers is not None else list(next(iter(named))) if named else list(range(L))
    if len(layer_ids) != L:
        raise DataError(f"{len(layer_ids)} layer names for routes with {L} MoE layers: pass {L} layers")
    if any(isinstance(x, bool) or not isinstance(x, int | np.integer) or x < 0 for x in layer_ids) \
            or len(set(layer_ids)) != L:
        raise ConfigError(f"layers={layer_ids} must be {L} distinct layer numbers >= 0: e.g. layers={list(range(L))}")
    weighted = all(d.weighted for d in domains.values())
    not_applicable = {q: why for q, why in NOT_APPLICABLE.items() if not (weighted and q == "gate_mean")}

    def new_profile() -> RoutingProfile:
        return RoutingProfile(
            layers=layer_ids, num_experts=E, top_k=k, keep_sequences=not stream,
            model_info={"source": "recorded routes", "num_experts": E, "top_k": k, "num_shared_experts": {},
                        "not_applicable": not_applicable},
            config={"keep_routes": not stream, "path_length": resolve_path_length(path_length, L), "stream": stream},
        )

    prof = new_profile()
    recorded: dict[str, Any] = {}
    for name, dom in domains.items():
        n = 0
        batch: list[tuple[int, np.ndarray, np.ndarray, np.ndarray | None]] = []
        for r, phase, w in dom.sequences():
            if r.size and r.max() >= E:
                raise DataError(f"domain {name!r}: expert id {int(r.max())} but --num-experts {E}: pass the "
                                "model's routed-expert count")
            batch.append((n, r, phase, w))
            n += 1
            if sum(len(b[1]) for b in batch) >= _BATCH_TOKENS or len(batch) >= 256:
                _add_batch(prof, new_profile, name, batch, E)
                batch = []
        _add_batch(prof, new_profile, name, batch, E)
        recorded[name] = dom.record()
        if not n:
            raise DataError(f"domain {name!r} has no routed tokens left (all {recorded[name]['prefix_cached']} were "
                            "missing)")
    prof.config["recorded"] = recorded
    quirks: dict[str, int] = {}
    for rec in recorded.values():
        for q, c in rec["quirks"].items():
            quirks[q] = quirks.get(q, 0) + c
    prof.model_info["engine_quirks"] = quirks
    for part in prof.phases.values():
        part.config["recorded"] = recorded
        part.model_info["engine_quirks"] = quirks
    return prof


#: Tokens added to a profile at once (co-activation counts are computed per batch).
_BATCH_TOKENS = 16_384


def _add_batch(prof: Any, new_profile: Callable[[], Any], name: str,
               batch: Sequence[tuple[int, np.ndarray, np.ndarray, np.ndarray | None]], E: int) -> None:
    """Add sequences ``(id, routes (T, L, k), phase (T,), weights or None)`` of domain ``name`` to ``prof`` and
    each phase's tokens to ``prof.phases[phase]`` (made with ``new_profile`` when first met)."""
    if not batch:
        return

    def add(target: Any, rows: list[tuple[int, np.ndarray, np.ndarray | None]]) -> None:
        stats = [_sequence_stats(r, w, E) for _, r, w in rows]
        target.add(name, [i for i, _, _ in rows], np.array([len(r) for _, r, _ in rows], np.int64),
                   {s: np.stack([st[s] for st in stats]) for s in stats[0]}, [(r, -1) for _, r, _ in rows])

    add(prof, [(i, r, w) for i, r, _, w in batch])
    for ph, code in PHASES.items():
        rows = [(i, r[m], None if w is None else w[m]) for i, r, phase, w in batch
                for m in [phase == code] if m.any()]
        if rows:
            add(prof.phases.get(ph) or prof.phases.setdefault(ph, new_profile()), rows)


def _common_shape(domains: Mapping[str, _Domain]) -> tuple[int, int]:
    shapes = {name: d.shape for name, d in domains.items() if d.shape != (0, 0)}
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


__all__ = ["FORMATS", "MISSING", "NOT_APPLICABLE", "PHASES", "QUIRKS", "RecordedRoutes", "load_routes",
           "profile_routes"]
