"""The process executor leaves nothing behind: a SIGKILLed caller takes its workers, the forkserver and the
resource tracker with it; a SIGKILLed worker is one line for the caller and no traceback on stderr."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from expertscope.testing import save_tiny_model

SCRIPT = Path(__file__).parent / "scripts" / "pool_parent.py"
ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("pool-model"), "mixtral", num_local_experts=4)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1"}


def _descendants(pid: int) -> set[int]:
    """Every live process whose parent chain reaches ``pid`` (read from /proc)."""
    parent: dict[int, int] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                stat = (p / "stat").read_bytes().rsplit(b")", 1)[-1].split()
            except OSError:
                continue
            if stat[0] != b"Z":
                parent[int(p.name)] = int(stat[1])
    out: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {c for c, pp in parent.items() if pp in frontier} - out
        out |= frontier
    return out


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_bytes().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except OSError:
        return False


def test_a_sigkilled_caller_takes_its_workers_forkserver_and_tracker_with_it(model_dir: Path) -> None:
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(model_dir), "wait"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_env(), text=True)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("pids"), line + proc.stderr.read()  # type: ignore[union-attr]
        children = _descendants(proc.pid)
        workers = {int(x) for x in line.split()[1:]} - {proc.pid}
        assert workers <= children and len(children) >= 4  # 2 workers, the forkserver, the resource tracker
        proc.send_signal(signal.SIGKILL)  # a caller that can stop nothing
        proc.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(_alive(p) for p in children):
            time.sleep(0.2)
        assert not [p for p in children if _alive(p)]
        assert "Traceback" not in proc.stderr.read()  # type: ignore[union-attr]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_sigkilled_worker_is_one_line_and_no_traceback(model_dir: Path) -> None:
    r = subprocess.run([sys.executable, str(SCRIPT), str(model_dir), "kill-worker"], capture_output=True, text=True,
                       env=_env(), timeout=180)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines() == ["error: a worker process died (out of memory?): the results finished so "
                                             "far are kept; rerun with --resume, or with fewer --workers"]
    assert "Traceback" not in r.stderr and "resource_tracker" not in r.stderr and "KeyError" not in r.stderr, r.stderr
