"""Headless Chromium for the tests: Debian's /usr/bin/chromium (`make test` installs it), never a
downloaded browser.

`headless` loads one page with Chromium's own `--dump-dom` / `--screenshot`. `DevTools` drives a page
over the DevTools protocol on a pipe (`--remote-debugging-pipe`: no port, no websocket library) for
what those flags cannot do: sign in to an HTTP basic-auth server, and wait until the page shows
what it should instead of for a fixed time. Credentials in the URL (`http://user:pass@host/`) are
no way in to a single-page app: Chromium loads the page with them, then refuses the app's every
`fetch()` ("Request cannot be constructed from a URL that includes credentials"). `DevTools` answers
the server's 401 challenge as a person answers the browser's password dialog (`Fetch.authRequired`
-> `Fetch.continueWithAuth`); Chromium then caches the credentials and sends them with the app's
requests itself.
"""

from __future__ import annotations

import base64
import json
import os
import select
import subprocess
import time
from pathlib import Path

import pytest

import psyface

ARTIFACTS = Path(psyface.__file__).resolve().parents[2] / "test-artifacts"  # screenshots (ignored by git)
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's chromium (`make test` installs it; never a downloaded browser)."""
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: `make system` (as root) or `apt-get install -y chromium` installs it")
    return CHROMIUM


def profile_folder(tmp_path: Path) -> Path:
    profile = tmp_path / f"profile-{time.monotonic_ns()}"
    profile.mkdir()
    return profile


def headless(chromium: Path, *args: str, tmp_path: Path) -> str:
    done = subprocess.run([str(chromium), *CHROMIUM_FLAGS, f"--user-data-dir={profile_folder(tmp_path)}", *args],
                          capture_output=True, text=True, timeout=120)
    return done.stdout


class DevTools:
    """One headless Chromium and one page in it, driven over the DevTools protocol:

    with DevTools(chromium, tmp_path, credentials=("user", "password")) as page:
        page.open(url)
        text = page.wait_for_text(["expected", "words"])
    """

    def __init__(self, chromium: Path, tmp_path: Path, credentials: tuple[str, str] | None = None,
                 size: tuple[int, int] = (1280, 1400)) -> None:
        self.credentials, self.size, self.challenges = credentials, size, 0
        commands_read, self._commands = os.pipe()
        self._replies, replies_write = os.pipe()
        profile = profile_folder(tmp_path)
        self.log = profile.with_suffix(".log")
        # the protocol's pipe is the child's fd 3 (commands in) and fd 4 (replies out); bash, as dash
        # takes no fd above 9. (No clash: commands_read < replies_write, and both are above 2.)
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                ["bash", "-c", 'exec "$@" 3<&"$COMMANDS" 4>&"$REPLIES"', "bash", str(chromium), *CHROMIUM_FLAGS,
                 f"--user-data-dir={profile}", "--remote-debugging-pipe"],
                pass_fds=(commands_read, replies_write), stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "COMMANDS": str(commands_read), "REPLIES": str(replies_write)})
        os.close(commands_read)
        os.close(replies_write)
        self._buffer, self._next_id, self.session = b"", 0, None

    def __enter__(self) -> DevTools:
        try:
            target = self.call("Target.createTarget", url="about:blank", newWindow=True,
                               width=self.size[0], height=self.size[1])
            self.session = self.call("Target.attachToTarget", targetId=target["targetId"], flatten=True)["sessionId"]
            if self.credentials:
                self.call("Fetch.enable", handleAuthRequests=True, patterns=[{"urlPattern": "*"}])
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._commands)  # Chromium exits when its command pipe closes
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._replies)

    def _send(self, method: str, params: dict) -> int:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            message["sessionId"] = self.session
        try:
            os.write(self._commands, json.dumps(message).encode() + b"\0")
        except BrokenPipeError:
            raise self._gone() from None
        return self._next_id

    def _gone(self) -> RuntimeError:
        output = self.log.read_text(errors="replace")[-3000:]
        return RuntimeError(f"chromium closed the DevTools pipe (exit code {self.process.poll()}):\n{output}")

    def _receive(self, deadline: float) -> dict | None:
        """The next message, or None at the deadline; answers paused requests and auth challenges."""
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._replies], [], [], left)[0]:
                return None
            chunk = os.read(self._replies, 1 << 20)
            if not chunk:
                raise self._gone()
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        message = json.loads(raw)
        method = message.get("method")
        if method == "Fetch.requestPaused":
            self._send("Fetch.continueRequest", {"requestId": message["params"]["requestId"]})
        elif method == "Fetch.authRequired":
            self.challenges += 1  # a wrong password is challenged again: give up after a few
            answer = ({"response": "ProvideCredentials", "username": self.credentials[0],
                       "password": self.credentials[1]} if self.challenges <= 3 else {"response": "CancelAuth"})
            self._send("Fetch.continueWithAuth", {"requestId": message["params"]["requestId"],
                                                  "authChallengeResponse": answer})
        return message

    def call(self, method: str, timeout: float = 60, **params: object) -> dict:
        sent, deadline = self._send(method, params), time.monotonic() + timeout
        while (message := self._receive(deadline)) is not None:
            if message.get("id") == sent:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
        raise TimeoutError(f"no answer to {method} within {timeout} s")

    def open(self, url: str) -> None:
        navigated = self.call("Page.navigate", url=url)
        if "errorText" in navigated:
            raise RuntimeError(f"{url}: {navigated['errorText']}")

    def text(self) -> str:
        """What the page shows as text (`document.body.innerText`)."""
        return self.call("Runtime.evaluate", expression="document.body ? document.body.innerText : ''",
                         returnByValue=True)["result"]["value"]

    def wait_for_text(self, expected: list[str], timeout: float = 60) -> str:
        """The page's text once it shows every string of `expected` as whole words, whatever the
        whitespace (a table row `name<TAB>1<TAB>2` reads `name 1 2`); fails saying which are missing."""
        deadline = time.monotonic() + timeout
        while True:
            shown = self.text()
            words = f" {' '.join(shown.split())} "
            missing = [text for text in expected if f" {' '.join(text.split())} " not in words]
            if not missing:
                return shown
            if time.monotonic() > deadline:
                raise AssertionError(f"not shown within {timeout} s: {missing}\npage text:\n{shown[:3000]}")
            pump_until = time.monotonic() + 0.25
            while self._receive(pump_until) is not None:
                pass

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
