"""Where batches run: in this process (``local``) or on a Ray cluster (``ray``).

Both run the same worker classes on the same batches (formed by the driver), and the driver merges the
partial statistics (integer counts, float64 sums per sequence) into one profile whose totals are computed
in a canonical order, so a Ray run equals the in-process run exactly when the workers compute alike
(same device, dtype and thread count: pin ``threads``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from .errors import ConfigError, ExpertscopeError
from .stats.profile import BatchProfiler, BatchResult


@dataclass(frozen=True)
class ModelSpec:
    """How a worker loads the model itself (models are never shipped to workers in a closure)."""

    source: str
    dtype: str = "auto"
    device: str | None = None
    device_map: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    threads: int | None = None

    def load(self) -> Any:
        import torch

        from .models.loading import load_model

        if self.threads:
            torch.set_num_threads(self.threads)
        return load_model(self.source, dtype=self.dtype, device=self.device, device_map=self.device_map,
                          trust_remote_code=self.trust_remote_code, allow_pickle=self.allow_pickle)


class LocalExecutor:
    """Runs every batch in this process on the already loaded model."""

    name = "local"

    def profile_batches(
        self, model: Any, plan: Sequence[tuple[str, list[int]]], texts: dict[str, list[str]], max_len: int | None
    ) -> Iterator[BatchResult]:
        worker = BatchProfiler(model, max_len)
        for name, ids in plan:
            yield worker(name, ids, [texts[name][i] for i in ids])


def _encode_result(res: BatchResult) -> dict[str, Any]:
    from safetensors.numpy import save

    arrays = {"n_tokens": np.asarray(res.n_tokens, np.int64)}
    arrays.update({k: np.ascontiguousarray(v) for k, v in res.stats.items()})
    return {"payload": save(arrays), "meta": json.dumps({"domain": res.domain, "ids": res.ids,
                                                          "n_truncated": res.n_truncated})}


def _decode_result(payload: bytes, meta: str) -> BatchResult:
    from safetensors.numpy import load

    arrays = load(payload)
    m = json.loads(meta)
    n = arrays.pop("n_tokens")
    return BatchResult(m["domain"], [int(i) for i in m["ids"]], n, arrays, int(m["n_truncated"]))


class _RayProfileActor:
    """Ray Data callable class: loads the model once in ``__init__``, profiles one batch per call."""

    def __init__(self, spec: dict[str, Any], max_length: int | None) -> None:
        self.worker = BatchProfiler(ModelSpec(**spec).load(), max_length)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list[Any]] = {"i": [], "payload": [], "meta": []}
        for i, domain, ids, texts in zip(batch["i"], batch["domain"], batch["ids"], batch["texts"], strict=True):
            res = self.worker(str(domain), json.loads(str(ids)), json.loads(str(texts)))
            enc = _encode_result(res)
            out["i"].append(int(i))
            out["payload"].append(enc["payload"])
            out["meta"].append(enc["meta"])
        return {"i": np.asarray(out["i"]), "payload": np.asarray(out["payload"], dtype=object),
                "meta": np.asarray(out["meta"], dtype=object)}


class RayExecutor:
    """Runs batches on Ray Data actors (``ActorPoolStrategy(size=workers)``), one model per actor.

    ``gpus_per_worker`` > 1 loads each actor's model with ``device_map="auto"`` over its GPUs;
    ``cpus_per_worker`` may be fractional (two full-CPU actors on a 2-core machine would deadlock the driver).
    """

    name = "ray"

    def __init__(
        self, spec: ModelSpec, workers: int = 2, gpus_per_worker: float = 0, cpus_per_worker: float | None = None,
        address: str | None = None, max_restarts: int = 0,
    ) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError("Ray is not installed: pip install 'expertscope[ray]', or use --executor local") from None
        if workers < 1:
            raise ConfigError(f"workers must be >= 1, got {workers}: pass --workers N")
        if not ray.is_initialized():
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, include_dashboard=False)
        available = ray.cluster_resources()
        need = gpus_per_worker * workers
        if need > available.get("GPU", 0):
            raise ConfigError(
                f"--gpus-per-worker {gpus_per_worker} × {workers} workers needs {need:g} GPUs but the Ray cluster has "
                f"{available.get('GPU', 0):g}: lower --workers/--gpus-per-worker or add GPU nodes"
            )
        if gpus_per_worker > 1 and spec.device_map is None:
            spec = ModelSpec(**{**asdict(spec), "device_map": "auto", "device": None})
        elif gpus_per_worker > 0 and spec.device is None:
            spec = ModelSpec(**{**asdict(spec), "device": "cuda"})
        self.spec = spec
        self.max_restarts = max_restarts
        self.workers = workers
        self.gpus_per_worker = gpus_per_worker
        self.cpus_per_worker = cpus_per_worker if cpus_per_worker is not None else max(
            0.25, (available.get("CPU", 1) - 0.5) / max(workers, 1))

    def _stream(self, rows: list[dict[str, Any]], actor: type, kwargs: dict[str, Any], kept: str) -> Iterator[Any]:
        """Map ``rows`` (one per call) over an actor pool of ``actor``; yield result rows as they finish.

        Any Ray failure (a dead worker, a task error) becomes one ExpertscopeError naming what is ``kept``.
        """
        import ray
        from ray.data import ActorPoolStrategy

        if not rows:
            return
        out = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            actor, fn_constructor_kwargs=kwargs, batch_size=1, compute=ActorPoolStrategy(size=self.workers),
            num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker or None, max_restarts=self.max_restarts,
        )
        try:
            yield from out.iter_rows()
        except ExpertscopeError:
            raise
        except Exception as e:  # Ray wraps worker deaths and task errors in its own exception types
            raise ExpertscopeError(
                f"a Ray worker failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}): {kept}; "
                "rerun with --resume"
            ) from None

    def run_items(self, model: Any, items: Sequence[tuple[int, int, list[int]]], settings: Any
                  ) -> Iterator[tuple[int, int, np.ndarray]]:
        """Causal-sweep items ``(input, layer, token ids)`` → ``(input, layer, CE (E,))`` as they finish."""
        rows = [{"i": i, "layer": layer, "ids": json.dumps(ids)} for i, layer, ids in items]
        kwargs = {"spec": asdict(self.spec), "settings": asdict(settings)}
        for row in self._stream(rows, _RayCausalActor, kwargs, "the finished items are kept in the checkpoint"):
            yield int(row["i"]), int(row["layer"]), np.asarray(json.loads(row["ce"]), dtype=np.float64)

    def profile_batches(
        self, model: Any, plan: Sequence[tuple[str, list[int]]], texts: dict[str, list[str]], max_len: int | None
    ) -> Iterator[BatchResult]:
        rows = [{"i": i, "domain": name, "ids": json.dumps(ids), "texts": json.dumps([texts[name][j] for j in ids])}
                for i, (name, ids) in enumerate(plan)]
        kwargs = {"spec": asdict(self.spec), "max_length": max_len}
        for row in self._stream(rows, _RayProfileActor, kwargs, "nothing partial was reported complete"):
            yield _decode_result(row["payload"], row["meta"])


class _RayCausalActor:
    """Ray Data callable class for causal sweeps: one (input, layer) item per call."""

    def __init__(self, spec: dict[str, Any], settings: dict[str, Any]) -> None:
        from .causal.sweep import CausalItemWorker, SweepSettings

        self.worker = CausalItemWorker(ModelSpec(**spec).load(), SweepSettings(**settings))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        rows: dict[str, list[Any]] = {"i": [], "layer": [], "ce": []}
        with torch.no_grad():
            for i, layer, ids in zip(batch["i"], batch["layer"], batch["ids"], strict=True):
                ce = self.worker(json.loads(str(ids)), int(layer))
                rows["i"].append(int(i))
                rows["layer"].append(int(layer))
                rows["ce"].append(json.dumps([float(x) for x in ce]))
        return {"i": np.asarray(rows["i"]), "layer": np.asarray(rows["layer"]),
                "ce": np.asarray(rows["ce"], dtype=object)}


def make_executor(
    kind: Literal["local", "ray"], spec: ModelSpec | None = None, workers: int = 2, gpus_per_worker: float = 0,
    cpus_per_worker: float | None = None,
) -> LocalExecutor | RayExecutor:
    """The executor named by ``--executor``."""
    if kind == "local":
        return LocalExecutor()
    if kind == "ray":
        if spec is None:
            raise ConfigError("the ray executor needs the model's source path: pass --model PATH")
        return RayExecutor(spec, workers=workers, gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker)
    raise ConfigError(f"unknown executor {kind!r}: use local or ray")
