"""What every ``autofab`` command shares: the consoles, the exit codes, and how bad input
becomes one red line on stderr instead of a traceback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import typer
from rich.console import Console

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_INTERNAL",
    "console",
    "err_console",
    "fail",
    "gap_text",
    "num",
    "user_errors",
]

#: Exit code for bad input, the same code click uses for usage errors.
EXIT_BAD_INPUT = 2
#: Exit code for a failed internal check (a bug, not the user's fault).
EXIT_INTERNAL = 1

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    """Print ``message`` as one red line on stderr and exit with ``code``.

    Printed without markup (messages quote user input, which may hold ``[...]``) and without
    wrapping, so a long message stays one line that scripts can grep.
    """
    err_console.print(f"error: {message}", style="bold red", markup=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def user_errors(doing: str | None = None) -> Iterator[None]:
    """Turn the errors that bad input raises into :func:`fail` (exit code 2).

    ``ValueError`` (``InstanceError`` included) messages already name the value at fault.
    ``doing``, when given, is put before every message, for steps whose errors do not say
    what was being done ("cannot write --json file 'x/out.json': No such file or directory").
    """
    try:
        yield
    except (OSError, ValueError) as exc:
        if isinstance(exc, OSError) and exc.strerror:
            detail = exc.strerror if doing else f"{exc.strerror}: {str(exc.filename)!r}"
        else:
            detail = str(exc)
        fail(f"{doing}: {detail}" if doing else detail)


def num(x: float) -> str:
    """A time or makespan as people write it: ``55``, not ``55.0``; ``60.5`` as is."""
    return str(int(x)) if float(x).is_integer() else f"{x:.8g}"


def gap_text(gap: float | None) -> str:
    return "n/a" if gap is None else f"{gap * 100:+.2f}%"
