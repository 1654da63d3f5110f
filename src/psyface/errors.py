"""User-facing errors: one exception type, one place that turns it into a clear message and exit code.

A user mistake (bad path, bad column, bad params) must never surface as a traceback; programming
errors still do, so they stay visible.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

EXIT_USER_ERROR = 2

F = TypeVar("F", bound=Callable[..., int | None])


class PsyfaceError(Exception):
    """A problem the user can fix: the message says what is wrong and where."""


def entry_point(main: F) -> F:
    """Wrap a stage/CLI `main` so a PsyfaceError prints `psyface: error: ...` and exits with 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        try:
            return main(*args, **kwargs)
        except PsyfaceError as error:
            print(f"psyface: error: {error}", file=sys.stderr)
            raise SystemExit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt:
            print("psyface: interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper  # type: ignore[return-value]
