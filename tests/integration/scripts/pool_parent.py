"""A caller of the process executor, for the clean-up tests: `pool_parent.py MODEL_DIR MODE`.

MODE ``wait``: run one job, print the workers' and the forkserver's pids, then sleep (the test SIGKILLs it).
MODE ``kill-worker``: run a job whose third item SIGKILLs its worker; print the caller's one-line error.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def pids(x: int) -> tuple[int, int]:
    return os.getpid(), os.getppid()


def suicidal(x: int) -> int:
    if x == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.1)
    return x


def factory_pids(model: object) -> object:
    return pids


def factory_suicidal(model: object) -> object:
    return suicidal


if __name__ == "__main__":
    from expertscope.execution import ModelSpec, make_executor

    ex = make_executor("process", ModelSpec(sys.argv[1], dtype="float32", threads=1), workers=2)
    if sys.argv[2] == "wait":
        got = list(ex.run_items(None, list(range(8)), factory_pids))
        print("pids", " ".join(str(p) for p in sorted({x for pair in got for x in pair})), flush=True)
        time.sleep(600)
    else:
        try:
            list(ex.run_items(None, [1, 2, 3, 4, 5, 6], factory_suicidal))
        except Exception as e:  # the executor's own one-line error
            print(f"error: {e}", flush=True)
        ex.close()
