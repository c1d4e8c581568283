"""Mistakes a user can fix, and how the command line says them.

A `UserError` is raised where the mistake is found (a checkpoint that is not one, an
image that does not decode, an empty data folder); `cli_errors` turns it into the one
stderr line the other commands print (`certseg serve: error: ...`), exit status 2,
instead of a traceback that hides the sentence under library frames.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NoReturn, ParamSpec, TypeVar

import typer

__all__ = [
    "EXTRA_OF_MODULE",
    "UserError",
    "cli_errors",
    "fail",
    "install_command",
    "missing_extra",
]

P = ParamSpec("P")
R = TypeVar("R")


class UserError(Exception):
    """A mistake in what the user gave (a path, a file, a value), said in one sentence."""


def fail(command: str, message: str, code: int = 2) -> NoReturn:
    """ "certseg <command>: error: <message>" on stderr (one line, for a person or a
    supervisor to act on), then exit with `code`."""
    typer.echo(f"certseg {command}: error: " + " ".join(str(message).split()), err=True)
    raise typer.Exit(code)


#: Optional modules, by the extra of pyproject.toml that installs them.
EXTRA_OF_MODULE = {
    "torch": "train",
    "torchvision": "train",
    "tqdm": "train",
    "matplotlib": "train",
    "cityscapesscripts": "train",
    "onnxscript": "train",
    "av": "client",
    "tensorrt": "gpu",
    "cuda": "gpu",
}


def install_command(extra: str) -> str:
    """How to install an extra: from the checkout (certseg is not on PyPI), editable."""
    return f"pip install -e '.[{extra}]'"


def missing_extra(exc: ModuleNotFoundError) -> str | None:
    """The sentence for an optional module not installed (None: not one of ours)."""
    root = (exc.name or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(root)
    if extra is None:
        return None
    return f"this needs {root}, from the `{extra}` extra: {install_command(extra)}"


def cli_errors(command: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate the typer command `certseg <command>`: a UserError, or an optional
    module not installed (the quickstart installs none), becomes
    "certseg <command>: error: <message>" on stderr and exit status 2."""

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)  # typer reads the signature through __wrapped__
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return fn(*args, **kwargs)
            except UserError as exc:
                fail(command, str(exc))
            except ModuleNotFoundError as exc:
                sentence = missing_extra(exc)
                if sentence is None:
                    raise
                fail(command, sentence)

        return run

    return wrap
