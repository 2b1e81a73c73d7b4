"""Where work runs: in this process (``local``), in worker processes on this machine (``process``) or on a Ray
cluster (``ray``), behind one :class:`Executor` protocol.

A job (profiling batches, causal-sweep items) is a list of picklable work items plus a *worker factory*:
``factory(model)`` builds a worker once per process, ``worker(item)`` computes one item's result. An
executor runs the worker over the items and yields the results in item order, whatever order they finish
in. Jobs define their workers beside themselves (:class:`expertscope.stats.profile.BatchProfiler`,
:class:`expertscope.causal.sweep.CausalItemWorker`); this module imports no job.

Worker processes and Ray actors load the model themselves from a :class:`ModelSpec` (models are never shipped
in a closure), so such a run equals the in-process run exactly when the workers compute alike (same device,
dtype and thread count: pin ``threads``).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

import numpy as np

from .errors import ConfigError, ExpertscopeError

if TYPE_CHECKING:
    from .models.model import MoEModel

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

#: ``factory(model) -> worker``; ``worker(item) -> result``. Both must pickle (top-level classes, partials).
WorkerFactory = Callable[["MoEModel"], Callable[[ItemT], ResultT]]


class Executor(Protocol):
    """Runs a worker built by ``factory`` over ``items`` and yields one result per item, in item order."""

    name: str

    def run_items(
        self, model: MoEModel, items: Sequence[ItemT], factory: Callable[[MoEModel], Callable[[ItemT], ResultT]]
    ) -> Iterator[ResultT]: ...


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

    def load(self) -> MoEModel:
        import torch

        from .models.loading import load_model

        if self.threads:
            torch.set_num_threads(self.threads)
        return load_model(self.source, dtype=self.dtype, device=self.device, device_map=self.device_map,
                          trust_remote_code=self.trust_remote_code, allow_pickle=self.allow_pickle)


class LocalExecutor:
    """Runs every item in this process, on the already loaded model, one after another."""

    name = "local"

    def run_items(
        self, model: MoEModel, items: Sequence[ItemT], factory: Callable[[MoEModel], Callable[[ItemT], ResultT]]
    ) -> Iterator[ResultT]:
        worker = factory(model)
        for item in items:
            yield worker(item)


# A worker process's model (loaded once, when the process starts) and its current job's worker.
_PROCESS_MODEL: Any = None
_PROCESS_JOB: tuple[str, Callable[[Any], Any]] | None = None


def _process_init(spec: dict[str, Any], filters: list[Any], formatwarning: Any) -> None:
    """Runs once in each worker process: the caller's warning filters and format (a spawned process starts
    without them), then load the model."""
    import warnings

    global _PROCESS_MODEL
    warnings.filters[:] = filters  # type: ignore[index]  # typeshed calls it a Sequence; it is a list
    warnings.formatwarning = formatwarning
    _PROCESS_MODEL = ModelSpec(**spec).load()


def _process_item(job: str, path: str, item: Any) -> Any:
    """One item of job ``job``: the job's worker is built from the factory pickled at ``path`` the first time
    this process meets the job (with the warning filters of the call that started it)."""
    import warnings

    global _PROCESS_JOB
    if _PROCESS_JOB is None or _PROCESS_JOB[0] != job:
        with open(path, "rb") as fh:
            factory, filters, formatwarning = pickle.load(fh)
        warnings.filters[:] = filters  # type: ignore[index]
        warnings.formatwarning = formatwarning
        _PROCESS_JOB = (job, factory(_PROCESS_MODEL))
    return _PROCESS_JOB[1](item)


class ProcessExecutor:
    """Runs items in ``workers`` processes on this machine (started fresh, ``spawn``), one model per process.

    The lever on a CPU with several cores when one torch thread per process is fastest (small models: two
    threads on one model spin rather than help). Each process loads the model from ``spec`` with
    ``spec.threads`` torch threads (default: the cores divided among the workers). The processes are started
    by the first job and serve every later one (a study's profiling and steering share them): starting a
    process and loading the model is paid once. :meth:`close` (or leaving a ``with`` block) stops them; so
    does the interpreter's exit.
    """

    name = "process"

    def __init__(self, spec: ModelSpec, workers: int = 2) -> None:
        import os

        if workers < 1:
            raise ConfigError(f"workers must be >= 1, got {workers}: pass --workers N")
        if spec.threads is None:
            spec = ModelSpec(**{**asdict(spec), "threads": max(1, (os.cpu_count() or 1) // workers)})
        self.spec, self.workers = spec, workers
        self._pool: Any = None

    def __enter__(self) -> ProcessExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes (a later job starts new ones)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def _started(self) -> Any:
        import multiprocessing
        import warnings
        import weakref
        from concurrent.futures import ProcessPoolExecutor

        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_process_init,
                initargs=(asdict(self.spec), list(warnings.filters), warnings.formatwarning))
            weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)
        return self._pool

    def run_items(
        self, model: MoEModel, items: Sequence[ItemT], factory: Callable[[MoEModel], Callable[[ItemT], ResultT]]
    ) -> Iterator[ResultT]:
        """Results in item order. ``model`` is not used (each process loads its own). A worker process that
        dies becomes one :class:`ExpertscopeError` (and the processes are replaced at the next job); errors
        the worker raises reach the caller unchanged."""
        import contextlib
        import os
        import tempfile
        import uuid
        import warnings
        from concurrent.futures.process import BrokenProcessPool

        if not items:
            return
        # The factory travels once per job, through a file each process reads once, not with every item.
        fd, path = tempfile.mkstemp(prefix="expertscope-job-", suffix=".pkl")
        futures: list[Any] = []
        try:
            with os.fdopen(fd, "wb") as fh:
                pickle.dump((factory, list(warnings.filters), warnings.formatwarning), fh)
            pool, job = self._started(), uuid.uuid4().hex
            futures = [pool.submit(_process_item, job, path, item) for item in items]
            for f in futures:
                yield f.result()
        except BrokenProcessPool:
            self.close()
            raise ExpertscopeError("a worker process died (out of memory?): the results finished so far are kept; "
                                   "rerun with --resume, or with fewer --workers") from None
        finally:
            for f in futures:
                f.cancel()
            for f in futures:  # the processes may still read the file until their running items finish
                if not f.cancelled():
                    with contextlib.suppress(Exception):  # the caller has its error already
                        f.exception()
            os.unlink(path)


class _RayWorkerActor:
    """Ray Data callable class: builds the worker once in ``__init__`` (loading the model), one item per call.

    Items and results travel pickled (exact for numpy arrays and floats).
    """

    def __init__(self, spec: dict[str, Any], factory: Callable[[Any], Callable[[Any], Any]]) -> None:
        self.worker = factory(ModelSpec(**spec).load())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        index, payload = [], []
        for i, item in zip(batch["i"], batch["item"], strict=True):
            index.append(int(i))
            payload.append(pickle.dumps(self.worker(pickle.loads(item))))
        return {"i": np.asarray(index), "payload": np.asarray(payload, dtype=object)}


def _worker_name(factory: Any) -> str:
    fn = getattr(factory, "func", factory)  # functools.partial
    return str(getattr(fn, "__name__", type(fn).__name__))


def _actor_class(factory: Any) -> type:
    """A subclass of :class:`_RayWorkerActor` named after the worker, so Ray's process titles say which job runs."""
    name = f"RayWorker_{_worker_name(factory)}"
    return type(name, (_RayWorkerActor,), {"__qualname__": name})


class RayExecutor:
    """Runs items on Ray Data actors (``ActorPoolStrategy(size=workers)``), one model per actor.

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

    def run_items(
        self, model: MoEModel, items: Sequence[ItemT], factory: Callable[[MoEModel], Callable[[ItemT], ResultT]]
    ) -> Iterator[ResultT]:
        """Results in item order, each yielded as soon as it and every earlier one have arrived.

        ``model`` is not used (each actor loads its own from the spec). Any Ray failure (a dead worker, a
        task error) becomes one :class:`ExpertscopeError`; results yielded before it stay valid.
        """
        import ray
        from ray.data import ActorPoolStrategy

        if not items:
            return
        rows = [{"i": i, "item": pickle.dumps(item)} for i, item in enumerate(items)]
        out = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            _actor_class(factory), fn_constructor_kwargs={"spec": asdict(self.spec), "factory": factory},
            batch_size=1, compute=ActorPoolStrategy(size=self.workers), num_cpus=self.cpus_per_worker,
            num_gpus=self.gpus_per_worker or None, max_restarts=self.max_restarts,
        )
        pending: dict[int, ResultT] = {}
        following = 0
        try:
            for row in out.iter_rows():
                pending[int(row["i"])] = pickle.loads(row["payload"])
                while following in pending:
                    yield pending.pop(following)
                    following += 1
        except ExpertscopeError:
            raise
        except Exception as e:  # Ray wraps worker deaths and task errors in its own exception types
            raise ExpertscopeError(
                f"a Ray worker failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}): the results finished "
                "so far are kept; rerun with --resume"
            ) from None


def make_executor(
    kind: Literal["local", "process", "ray"], spec: ModelSpec | None = None, workers: int = 2,
    gpus_per_worker: float = 0, cpus_per_worker: float | None = None,
) -> LocalExecutor | ProcessExecutor | RayExecutor:
    """The executor named by ``--executor``."""
    from .validation import check_nonnegative, check_positive

    check_positive(workers, "workers")
    check_nonnegative(gpus_per_worker, "gpus_per_worker")
    if kind == "local":
        return LocalExecutor()
    if kind == "process":
        if spec is None:
            raise ConfigError("the process executor needs the model's source: pass --model NAME_OR_PATH")
        return ProcessExecutor(spec, workers=workers)
    if kind == "ray":
        if spec is None:
            raise ConfigError("the ray executor needs the model's source path: pass --model PATH")
        return RayExecutor(spec, workers=workers, gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker)
    raise ConfigError(f"unknown executor {kind!r}: use local, process or ray")


__all__ = ["Executor", "LocalExecutor", "ModelSpec", "ProcessExecutor", "RayExecutor", "WorkerFactory", "make_executor"]
