"""User-facing errors: one exception type, one place that turns it into a clear message and exit code.

A user mistake (bad path, bad column, bad params) must never surface as a traceback; programming
errors still do, so they stay visible.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable
from typing import TypeVar

EXIT_USER_ERROR = 2

F = TypeVar("F", bound=Callable[..., int | None])


class PsyfaceError(Exception):
    """A problem the user can fix: the message says what is wrong and where."""


def not_utf8(path: object, error: UnicodeDecodeError) -> PsyfaceError:
    """The error for a text file (table, YAML) in another encoding: which byte, where, and the fix."""
    return PsyfaceError(f"{path} is not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start}); "
                        "re-save it as UTF-8")


def server_refusal(error: BaseException) -> str | None:
    """One line for a tracking server's refusal, failure or absence (401, 403, 5xx, unreachable), else None.

    These reach the user from anywhere MLflow talks to the server, so they are translated here, at the
    one edge every command passes; MLflow is looked up only if something already imported it."""
    exceptions = sys.modules.get("mlflow.exceptions")
    if exceptions is None or not isinstance(error, exceptions.MlflowException):
        return None
    text = str(error)
    named = re.search(r"API request to (https?://[^/\s]+)", text)
    server = os.environ.get("MLFLOW_TRACKING_URI") or (named.group(1) if named else "the tracking server")
    endpoint = re.search(r"endpoint (\S+)", text)
    where = f" ({endpoint.group(1)})" if endpoint else ""
    if error.error_code == "UNAUTHENTICATED" or error.get_http_status_code() == 401:
        return (f"{server} refused the request{where}: not authenticated (401); set MLFLOW_TRACKING_USERNAME "
                "and MLFLOW_TRACKING_PASSWORD to your user on that server")
    if error.error_code == "PERMISSION_DENIED" or error.get_http_status_code() == 403:
        user = os.environ.get("MLFLOW_TRACKING_USERNAME", "?")
        return (f"{server} refused the request{where}: user {user!r} lacks the permission (403); ask the server's "
                "admin for the role it needs (`psyface server user add NAME --role edit`)")
    failing = re.search(r"too many (5\d\d) error responses", text)
    if failing:  # urllib3 gave up retrying: the server is up, but failing (e.g. its database is down)
        return (f"{server} answers with errors{where}: HTTP {failing.group(1)} on every retry; the fault is on the "
                "server, see its log (logs/mlflow.log in a `psyface server` folder)")
    if "Max retries exceeded" in text or "Connection refused" in text or "ConnectionError" in text:
        return f"cannot reach {server}{where}: is the server running (`psyface server status DIR`)?"
    return None


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
        except Exception as error:
            message = server_refusal(error)
            if message is None:
                raise
            print(f"psyface: error: {message}", file=sys.stderr)
            raise SystemExit(EXIT_USER_ERROR) from None

    return wrapper  # type: ignore[return-value]
