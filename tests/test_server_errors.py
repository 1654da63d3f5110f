"""What a user reads when the tracking server fails (5xx) or is not there: two different one-liners.

A real HTTP server on loopback answers every request with 500, and the real MLflow
client talks to it; only its retries are cut to none, so the test does not wait out the backoff."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from psyface.errors import server_refusal
from psyface.server import free_port


class AlwaysFailing(http.server.BaseHTTPRequestHandler):
    """Answers every request with 500, as a server whose database is down does."""

    def do_GET(self) -> None:
        self.send_response(500)
        self.end_headers()
        self.wfile.write(b"Internal Server Error")

    do_POST = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def no_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def failing_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), AlwaysFailing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def refusal_line(url: str) -> str:
    with pytest.raises(MlflowException) as raised:
        MlflowClient(url).search_experiments()
    line = server_refusal(raised.value)
    assert line is not None and "\n" not in line, line
    return line


def test_a_server_answering_500_is_reported_as_failing_not_as_unreachable(no_retries, failing_server):
    line = refusal_line(failing_server)
    assert line.startswith(f"{failing_server} answers with errors"), line
    assert "HTTP 500" in line and "mlflow.log" in line and "cannot reach" not in line


def test_a_port_nobody_listens_on_is_reported_as_unreachable(no_retries):
    url = f"http://127.0.0.1:{free_port()}"
    line = refusal_line(url)
    assert line.startswith(f"cannot reach {url}"), line
    assert "answers with errors" not in line
