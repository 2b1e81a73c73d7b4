"""The ``expertscope`` command line. Thin: every command parses flags and calls the library."""

from __future__ import annotations

import importlib
import sys
import warnings

import typer

app = typer.Typer(
    name="expertscope",
    help=(
        "What gets activated inside Mixture-of-Experts language models.\n\n"
        "Examples:\n\n"
        "  expertscope run                                   # the whole study on the bundled demo\n\n"
        "  expertscope profile --model demo --domain math=math.jsonl --out runs/p\n\n"
        "  expertscope domains runs/p"
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)

# Each module registers its commands on `app`; one module per area keeps this file thin.
_COMMAND_MODULES = (
    "expertscope.cli.commands",
    "expertscope.cli.data_cmds",
    "expertscope.cli.report_cmds",
)


def _register() -> None:
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        module.register(app)


_register()


def quiet_third_party_warnings() -> None:
    """Hide deprecation and future warnings that third-party libraries raise about their own internals
    (e.g. transformers' ``is_gradient_checkpointing``): they say nothing about the user's run. expertscope's
    own warnings stay visible, and so does everything when the user passes ``-W`` or ``PYTHONWARNINGS``."""
    if sys.warnoptions:
        return
    for category in (FutureWarning, DeprecationWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(?!expertscope(\.|$))")


def one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                     line: str | None = None) -> str:
    """A warning as one line on stderr (``warning: ...``), without the source line Python shows beneath it."""
    text = " ".join(str(message).split())
    return f"warning: {text}\n" if category is UserWarning else f"warning ({category.__name__}): {text}\n"


def main() -> None:
    """Console-script entry point (the library itself never changes warning filters or their format)."""
    quiet_third_party_warnings()
    warnings.formatwarning = one_line_warning
    app()


if __name__ == "__main__":
    main()
