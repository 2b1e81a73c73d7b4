"""Shared fixtures: tiny random MoE models of every router family (built once per session)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# One torch thread unless told otherwise: the tiny models gain nothing from a second one, and with several test
# processes on a few cores extra OpenMP threads only spin.
torch.set_num_threads(int(os.environ.get("EXPERTSCOPE_TEST_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))))

from expertscope.testing import TINY_BUILDERS, tiny_model  # noqa: E402

FAMILIES = sorted(TINY_BUILDERS)


def _cache_cli_commands() -> None:
    """typer's CliRunner rebuilds the whole click command tree from the app on every invoke (about 40 ms of
    option parsing set-up per call, hundreds of calls in the suite; a real CLI process builds it once). Build it
    once per app and per set of registered commands: what a command does is still looked up when it runs, so
    tests that monkeypatch the library see their patches."""
    import weakref

    import typer.testing

    build = typer.testing._get_command
    built: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def cached(app):
        key = (len(app.registered_commands), len(app.registered_groups), app.registered_callback)
        hit = built.get(app)
        if hit is None or hit[0] != key:
            built[app] = hit = (key, build(app))
        return hit[1]

    typer.testing._get_command = cached


_cache_cli_commands()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Pin torch to one thread for a module: with the CPU shared, two OpenMP threads spin-wait (~50x slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _record_saves(monkeypatch, render: bool) -> list[str]:
    """The names of the figures saved from now on, in order (``render=False``: built, never rendered)."""
    from expertscope.report import figure_style

    names: list[str] = []
    save = figure_style.save_figure
    monkeypatch.setattr(figure_style, "save_figure",
                        lambda fig, out, name: names.append(name) or (save(fig, out, name) if render else []))
    return names


@pytest.fixture
def no_figures(monkeypatch) -> list[str]:
    """Figures are built but not rendered or saved, for tests about something else (rendering is tested in
    test_report.py); returns the names of the figures that would have been saved."""
    return _record_saves(monkeypatch, render=False)


@pytest.fixture
def drawn_figures(monkeypatch) -> list[str]:
    """The names of the figures drawn (rendered and saved as usual), in order."""
    return _record_saves(monkeypatch, render=True)


@pytest.fixture(scope="session")
def tiny_cache() -> dict:
    return {}


@pytest.fixture
def make_tiny(tiny_cache: dict):
    """``make_tiny(family, dtype=torch.float32, **config)``: a cached tiny model (do not mutate weights)."""

    def make(family: str, dtype: torch.dtype = torch.float32, **config):
        key = (family, dtype, tuple(sorted(config.items())))
        if key not in tiny_cache:
            tiny_cache[key] = tiny_model(family, seed=0, dtype=dtype, **config)
        return tiny_cache[key]

    return make


#: Module-scoped fixtures that take seconds to build (a whole study run, a whole report, a Ray cluster). pytest-xdist
#: builds a module fixture once in every test process that runs a test using it; `make test`'s --dist loadgroup
#: sends all the tests using one of these to the same process, so each is built once.
SHARED_FIXTURES = ("full_run", "built_report", "cluster")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        shared = [name for name in SHARED_FIXTURES if name in getattr(item, "fixturenames", ())]
        if shared and not any(item.iter_markers("xdist_group")):  # a module's own group stands
            item.add_marker(pytest.mark.xdist_group(f"{item.module.__name__}:{shared[0]}"))
    # Longest first: modules holding a group, then by their number of slow tests. pytest-xdist hands out work
    # in collection order, so the long groups start early instead of leaving one process busy at the end.
    # Each module's tests stay together (their module fixtures are built once) and in their own order.
    grouped: set[object] = set()
    slow: dict[object, int] = {}
    for item in items:
        if item.get_closest_marker("xdist_group") is not None:
            grouped.add(item.path)
        slow[item.path] = slow.get(item.path, 0) + (item.get_closest_marker("slow") is not None)
    items.sort(key=lambda i: (i.path not in grouped, -slow[i.path]))


def pytest_configure(config) -> None:
    """`make test` groups tests with --dist loadgroup. pytest 9.2 keeps node ids where pytest-xdist 3.8 no longer
    writes a test's group (pytest-dev/pytest-xdist#1386): the groups would be silently ignored (a Ray cluster
    in each test process, the whole-study fixture built twice). Stop with the fix instead."""
    import importlib.metadata as md

    from packaging.version import Version

    if config.getoption("dist", default=None) != "loadgroup" or hasattr(config, "workerinput"):
        return
    pytest_v, xdist_v = md.version("pytest"), md.version("pytest-xdist")
    if Version(pytest_v) >= Version("9.2.0.dev0") and Version(xdist_v) <= Version("3.8.0"):
        raise pytest.UsageError(f"pytest {pytest_v} with pytest-xdist {xdist_v} ignores --dist loadgroup's groups "
                                "(pytest-dev/pytest-xdist#1386): install the versions in constraints.txt (make setup "
                                "does), or run without -n")
