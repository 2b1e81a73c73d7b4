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


def _process_init(spec: dict[str, Any], filters: list[Any], formatwarning: Any, parent: int | None = None) -> None:
    """Runs once in each worker process: watch the process that started the pool (``parent``), take the
    caller's warning filters and format (a new process starts without them), then load the model."""
    import warnings

    global _PROCESS_MODEL
    if parent is not None:
        watch_parent(parent)
    warnings.filters[:] = filters  # type: ignore[index]  # typeshed calls it a Sequence; it is a list
    warnings.formatwarning = formatwarning
    _PROCESS_MODEL = ModelSpec(**spec).load()


def _alive(pid: int) -> bool:
    """``pid`` is running (an exited process waiting to be reaped, a zombie, counts as gone)."""
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except OSError:
        return True  # no /proc (macOS): kill(0) said it exists


def watch_parent(pid: int, poll: float = 1.0) -> None:
    """End this process (exit code 0, no traceback) as soon as process ``pid`` is gone, even when it was
    SIGKILLed and could stop nothing: a pool's workers are children of the forkserver, which outlives the
    caller while its workers live (they hold its pipe), and the resource tracker lives while any of them do.
    Waits on a pidfd where Linux has one, else polls every ``poll`` seconds."""
    import os
    import select
    import threading
    import time

    def watch() -> None:
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            fd = None
        if fd is not None:
            select.select([fd], [], [])  # readable once the process has exited
        else:
            while _alive(pid):
                time.sleep(poll)
        os._exit(0)

    threading.Thread(target=watch, name="expertscope-parent-watch", daemon=True).start()


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


def _quiet_resource_tracker() -> None:
    """Start multiprocessing's resource tracker (once) with its stderr on /dev/null: when a worker or the
    caller is killed, it prints warnings about leaked semaphores and tracebacks of its own bookkeeping
    (``KeyError``) that say nothing to a user; the caller reports a dead worker in one line instead."""
    import os
    from multiprocessing import resource_tracker

    tracker = resource_tracker._resource_tracker
    if getattr(tracker, "_fd", None) is not None:
        return
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        resource_tracker.ensure_running()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _worker_context(spec: ModelSpec) -> Any:
    """The multiprocessing context worker processes start from: ``forkserver`` where the platform has it (one
    server process imports torch, transformers, expertscope and the model's family module once, and each
    worker is forked from it: a spawned worker imports them itself, about 5 s of CPU each), ``spawn`` elsewhere.
    Never a fork of the caller (its threads and CUDA state must not be copied)."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    _quiet_resource_tracker()
    preload = ["__main__", "expertscope", "transformers.modeling_utils"]
    try:  # a local checkpoint names its family: import its modeling module in the server too
        import json
        from pathlib import Path

        kind = json.loads((Path(spec.source) / "config.json").read_text())["model_type"]
        preload.append(f"transformers.models.{kind}.modeling_{kind}")
    except (OSError, ValueError, KeyError, TypeError):
        pass
    # Only read when the server starts (the first pool of this process); a module that fails to import is
    # skipped there and imported by the worker that needs it.
    ctx.set_forkserver_preload(preload)
    try:
        from multiprocessing import forkserver

        forkserver.ensure_running()
    except OSError:  # e.g. its socket's path under a long TMPDIR exceeds AF_UNIX's limit
        return multiprocessing.get_context("spawn")
    return ctx


class ProcessExecutor:
    """Runs items in ``workers`` processes on this machine, one model per process.

    The lever on a CPU with several cores when one torch thread per process is fastest (small models: two
    threads on one model spin rather than help). Each process loads the model from ``spec`` with
    ``spec.threads`` torch threads (default: the cores divided among the workers). The processes are started
    by the first job and serve every later one (a study's profiling and steering share them): starting a
    process and loading the model is paid once. They are forked from a server process that has imported the
    libraries once (``forkserver``; ``spawn`` where the platform has no forkserver). :meth:`close` (or leaving
    a ``with`` block) stops them; so does the interpreter's exit.
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
        import os
        import warnings
        import weakref
        from concurrent.futures import ProcessPoolExecutor

        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers, mp_context=_worker_context(self.spec), initializer=_process_init,
                initargs=(asdict(self.spec), list(warnings.filters), warnings.formatwarning, os.getpid()))
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


class _RayActor:
    """A Ray actor holding one loaded model; it serves the items of every job sent to it, building each job's
    worker from the job's factory the first time it meets the job."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.model = ModelSpec(**spec).load()
        self.job: tuple[str, Callable[[Any], Any]] | None = None

    def pid(self) -> int:
        """This actor's process id (a cheap call: it also tells the driver the actor is alive)."""
        import os

        return os.getpid()

    def run(self, job: str, factory: list[Any], item: Any) -> Any:
        """``factory`` is ``[ObjectRef]`` (a nested reference Ray does not resolve per call): fetched once per
        job."""
        import ray

        if self.job is None or self.job[0] != job:
            self.job = (job, ray.get(factory[0])(self.model))
        return self.job[1](item)


class RayExecutor:
    """Runs items on ``workers`` Ray actors, one model per actor.

    The actors are started by the first job and serve every later one (a study's profiling and steering
    share them): starting an actor and loading its model is paid once. Items go to whichever actor is free;
    results come back in item order. An actor that dies fails its job (the results yielded so far stay
    valid) and is replaced, alone, at the next job. :meth:`close` (or leaving a ``with`` block) stops them.
    ``gpus_per_worker`` > 1 loads each actor's model with ``device_map="auto"`` over its GPUs;
    ``cpus_per_worker`` may be fractional (two full-CPU actors on a 2-core machine would deadlock the driver).
    ``max_restarts`` > 0 lets Ray restart a dead actor (reloading its model) and retry its item instead.
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
        self._actors: list[Any] = []
        self._check = False  # a job failed: find dead actors before the next one

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the actors (a later job starts new ones)."""
        import ray

        actors, self._actors = self._actors, []
        for a in actors:
            ray.kill(a)

    def pids(self) -> list[int]:
        """Process ids of the running actors (none before the first job)."""
        import ray

        return [int(p) for p in ray.get([a.pid.remote() for a in self._actors])]

    def _new_actor(self) -> Any:
        import ray

        cls = ray.remote(_RayActor).options(
            num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker or None,
            max_restarts=self.max_restarts, max_task_retries=self.max_restarts)
        return cls.remote(asdict(self.spec))

    def _started(self) -> list[Any]:
        import ray

        if self._check:
            alive = []
            for a in self._actors:
                try:
                    ray.get(a.pid.remote())
                    alive.append(a)
                except ray.exceptions.RayError:
                    ray.kill(a)
            self._actors, self._check = alive, False
        while len(self._actors) < self.workers:
            self._actors.append(self._new_actor())
        return self._actors

    def run_items(
        self, model: MoEModel, items: Sequence[ItemT], factory: Callable[[MoEModel], Callable[[ItemT], ResultT]]
    ) -> Iterator[ResultT]:
        """Results in item order, each yielded as soon as it and every earlier one have arrived.

        ``model`` is not used (each actor loads its own from the spec). A dead actor becomes one
        :class:`ExpertscopeError`; an :class:`ExpertscopeError` the worker raises reaches the caller as it is,
        any other error inside a worker as one :class:`ExpertscopeError` naming it. Results yielded before
        either stay valid.
        """
        import uuid

        import ray

        if not items:
            return
        job, fref = uuid.uuid4().hex, [ray.put(factory)]
        todo = iter(enumerate(items))
        running: dict[Any, tuple[int, Any]] = {}  # task -> (item index, actor)

        def give(actor: Any) -> None:  # the next item to a free actor
            nxt = next(todo, None)
            if nxt is not None:
                running[actor.run.remote(job, fref, nxt[1])] = (nxt[0], actor)

        pending: dict[int, ResultT] = {}
        following = 0
        try:
            for actor in self._started():
                give(actor)
            while running:
                [ready], _ = ray.wait(list(running), num_returns=1)
                i, actor = running.pop(ready)
                pending[i] = ray.get(ready)
                give(actor)
                while following in pending:
                    yield pending.pop(following)
                    following += 1
        except ray.exceptions.RayTaskError as e:
            self._check = True
            cause = getattr(e, "cause", None)
            if isinstance(cause, ExpertscopeError):
                raise cause from None
            raise ExpertscopeError(f"a Ray worker raised {type(cause).__name__}: {str(cause).splitlines()[0][:200]}"
                                   if cause is not None else f"a Ray task failed: {e}") from None
        except ray.exceptions.RayError as e:  # a dead actor, a lost node
            self._check = True
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
