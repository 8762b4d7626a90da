"""The first run without a network: one request, one line that says what to do, no library noise.

No test here reaches the internet: HF_ENDPOINT points at a socket on 127.0.0.1 that this test
owns. It accepts each connection, counts it and closes it at once, as a dead proxy or a Hub
that cannot be reached would; so the tests count connection attempts instead of timing them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffgen.cli.app import app
from tests.test_info_pull import config_only
from tests.test_loader import hub_cache

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


class ClosingServer:
    """A TCP listener that reads each HTTP request's head, records its request line and
    closes the connection without answering (``Server disconnected without a response``)."""

    def __init__(self):
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.requests: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:  # closed by stop()
                return
            with connection:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = connection.recv(4096)
                    if not chunk:
                        break
                    head += chunk
            self.requests.append(head.split(b"\r\n", 1)[0].decode("latin-1"))

    @property
    def model_requests(self) -> list[str]:
        """Requests for a model's files (``/resolve/``) or its metadata (``/api/models/``). The
        Hub client's own once-a-day fetch of /api/agent-harnesses (no retry) is not ours."""
        return [r for r in self.requests if "/resolve/" in r or "/api/models/" in r]

    def assert_no_retry(self):
        assert len(self.requests) == len(set(self.requests)), self.requests

    def stop(self):
        # shutdown() wakes the accept() blocked in the thread; then the thread ends on its own.
        try:
            self.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.socket.close()
        self._thread.join()


@pytest.fixture
def dead_hub():
    server = ClosingServer()
    yield server
    server.stop()


def closed_port() -> int:
    """A loopback port with nothing listening (connections are refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def diffgen(*args, hf_home, endpoint, debug=False):
    env = {k: v for k, v in os.environ.items() if k not in {"HF_HUB_OFFLINE", "HF_HUB_CACHE", "DIFFGEN_DEBUG"}}
    env.update(HF_HOME=str(hf_home), HF_ENDPOINT=endpoint, PYTHONPATH=str(ROOT))
    if debug:
        env["DIFFGEN_DEBUG"] = "1"
    return subprocess.run([sys.executable, "-m", "diffgen", *args], capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL)


def assert_one_clear_line(result, repo_id):
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr  # no retry warnings, no library log lines, no traceback
    line = lines[0]
    assert line.startswith("diffgen: error: ") and "could not be reached" in line
    assert f"diffgen pull {repo_id}" in line and "--offline" in line and "-m ./dir" in line
    assert result.stdout == ""


def test_no_network_and_an_empty_cache_fails_after_one_attempt(dead_hub, tmp_path):
    result = diffgen("run", "-m", "acme/absent", "Hi", hf_home=tmp_path / "hf",
                     endpoint=f"http://127.0.0.1:{dead_hub.port}")
    assert_one_clear_line(result, "acme/absent")
    # huggingface_hub alone would send this HEAD 6 times, with backoff (~25 s) and a warning each time
    assert dead_hub.model_requests == ["HEAD /acme/absent/resolve/main/config.json HTTP/1.1"]
    dead_hub.assert_no_retry()


def test_connection_refused_is_the_same_one_line(tmp_path):
    result = diffgen("run", "-m", "acme/absent", "Hi", hf_home=tmp_path / "hf",
                     endpoint=f"http://127.0.0.1:{closed_port()}")
    assert_one_clear_line(result, "acme/absent")
    assert "Connection refused" in result.stderr


@pytest.mark.parametrize("command", [["info", "-m", "acme/absent"], ["bench", "-m", "acme/absent"]])
def test_other_commands_fail_the_same_way(dead_hub, tmp_path, command):
    result = diffgen(*command, hf_home=tmp_path / "hf", endpoint=f"http://127.0.0.1:{dead_hub.port}")
    assert_one_clear_line(result, "acme/absent")
    assert len(dead_hub.model_requests) == 1
    dead_hub.assert_no_retry()


def test_pull_without_network_says_it_needs_one(dead_hub, tmp_path):
    result = diffgen("pull", "acme/absent", hf_home=tmp_path / "hf", endpoint=f"http://127.0.0.1:{dead_hub.port}")
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "could not be reached" in result.stderr and "pull needs a network" in result.stderr
    assert len(dead_hub.model_requests) == 1
    dead_hub.assert_no_retry()


def test_a_filled_cache_is_used_when_the_hub_cannot_be_reached(dead_hub, tiny_checkpoint, tmp_path):
    """Without --offline and without a network, a downloaded model still runs (one probe, then the cache)."""
    hub_cache(tmp_path / "hf" / "hub", "acme/tiny", tiny_checkpoint)
    result = diffgen("run", "-m", "acme/tiny", "-n", "8", "--steps", "2", "--quiet", "Hi",
                     hf_home=tmp_path / "hf", endpoint=f"http://127.0.0.1:{dead_hub.port}")
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and result.stdout.strip(), (result.stderr, result.stdout)
    assert len(dead_hub.model_requests) == 1
    dead_hub.assert_no_retry()


def test_offline_with_an_empty_cache_names_the_ways_out(dead_hub, tmp_path):
    result = diffgen("run", "--offline", "-m", "acme/absent", "Hi", hf_home=tmp_path / "hf",
                     endpoint=f"http://127.0.0.1:{dead_hub.port}")
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "offline mode is on" in result.stderr and "diffgen pull acme/absent" in result.stderr
    assert dead_hub.requests == []


def test_debug_shows_the_libraries_and_the_traceback(dead_hub, tmp_path):
    result = diffgen("run", "-m", "acme/absent", "Hi", hf_home=tmp_path / "hf",
                     endpoint=f"http://127.0.0.1:{dead_hub.port}", debug=True)
    assert result.returncode == 1 and "Traceback" in result.stderr and "HubUnreachableError" in result.stderr


def test_a_directory_named_without_dot_slash_is_local(tmp_path, monkeypatch):
    shutil.copytree(config_only(tmp_path), tmp_path / "work" / "ckpt")
    monkeypatch.chdir(tmp_path / "work")
    result = runner.invoke(app, ["info", "-m", "ckpt", "--json", "--max-memory", "24GB"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["source"] == str(tmp_path / "work" / "ckpt")


@pytest.mark.parametrize("name", ["ckpt", "./ckpt", "models/ckpt/v1"])
def test_a_missing_directory_is_not_sent_to_the_hub(tmp_path, monkeypatch, name):
    """A name that is not org/name never reaches the Hub client (in-process, so offline mode
    would turn any attempt into an 'offline' error instead of the one below)."""
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["run", "-m", name, "Hi"])
    assert result.exit_code == 1 and len(result.stderr.splitlines()) == 1, result.stderr
    assert f"no directory {name}" in result.stderr and "org/name" in result.stderr
    assert "offline" not in result.stderr
