"""Shared fixtures: tiny random DiffusionGemma checkpoints, built once per test session.

No test touches the network: HF_HUB_OFFLINE is forced on for this process and every
subprocess it starts. Nor the user's cache: DIFFGEN_CACHE points at a fresh directory per
session (quantised loads write and reuse the quantised-weights cache there, as a user's would).

Torch runs one thread here and in every subprocess (OMP_NUM_THREADS=1, set before torch is
imported). The tiny models gain nothing from a second thread, and on a loaded machine OpenMP's
spinning threads fight for the cores: measured on the 2-core CI machine beside other work, 48
tiny denoising steps took 0.15 s of CPU with one thread and 2.8-4.3 s with two.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
for _threads in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_threads, "1")
os.environ.pop("DIFFGEN_MODEL", None)
os.environ.pop("DIFFGEN_DEBUG", None)
os.environ.pop("DIFFGEN_QUANT_CACHE", None)

# Adaptive stopping fires on this checkpoint with these settings, at different steps for
# different rows (a random model's logits are otherwise too flat for the confidence test).
SHARP_LOGIT_SCALE = 50.0
SHARP_SETTINGS = {"entropy_bound": 5.0, "confidence_threshold": 1.5}


@pytest.fixture(scope="session", autouse=True)
def diffgen_cache(tmp_path_factory) -> Path:
    """diffgen's cache directory for this session (``DIFFGEN_CACHE``, inherited by subprocesses)."""
    path = tmp_path_factory.mktemp("diffgen-cache")
    os.environ["DIFFGEN_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from devtools.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)


@pytest.fixture(scope="session")
def sharp_checkpoint(tmp_path_factory) -> Path:
    from devtools.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("sharp") / "ckpt", seed=0, logit_scale=SHARP_LOGIT_SCALE)


@pytest.fixture(scope="session")
def vision_checkpoint(tmp_path_factory) -> Path:
    """A tiny checkpoint with a tiny vision tower and an image processor (``images=True``)."""
    from devtools.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("vision") / "ckpt", seed=0, images=True)


def _load(path: Path):
    from diffgen.loading.loader import load
    from diffgen.planning.plan import LoadPlan

    return load(str(path), LoadPlan("cpu", "float32"), progress=False)


@pytest.fixture(scope="session")
def tiny(tiny_checkpoint):
    """The tiny checkpoint loaded on the CPU in fp32 (a LoadedModel)."""
    return _load(tiny_checkpoint)


@pytest.fixture(scope="session")
def sharp(sharp_checkpoint):
    return _load(sharp_checkpoint)


@pytest.fixture(scope="session")
def vision(vision_checkpoint):
    """The tiny vision checkpoint loaded on the CPU in fp32."""
    return _load(vision_checkpoint)


class EagerGraphs:
    """A graph recorder that replays by running the body (the CUDA-graph path's logic on the CPU),
    counting its recordings and replays."""

    def __init__(self):
        self.recorded = 0
        self.replays = 0

    def supports(self, device) -> bool:
        return True

    def record(self, body):
        self.recorded += 1

        def replay():
            self.replays += 1
            body()
        return replay


@pytest.fixture
def eager_graphs(monkeypatch) -> EagerGraphs:
    """Every graph recorded during the test is an :class:`EagerGraphs` recording, on any device
    (``diffgen.denoise.runner.recorder`` replaced)."""
    from diffgen.denoise import runner

    recorder = EagerGraphs()
    monkeypatch.setattr(runner, "recorder", recorder)
    return recorder


def write_image(path: Path, width: int = 30, height: int = 20, *, seed: int = 0, format: str = "PNG") -> Path:
    """A random RGB image saved with pillow; returns ``path``."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=format)
    return path


def run_cli(*args: str, input: bytes | None = None, env: dict | None = None,
            shell: str | None = None) -> subprocess.CompletedProcess:
    """Run the real ``diffgen`` CLI in a subprocess (``python -m diffgen``). No timeout: a loaded
    machine may take minutes, and pytest-timeout is the safety net against a hang."""
    full_env = {**os.environ, **(env or {})}
    if shell is not None:
        return subprocess.run(["bash", "-c", shell], input=input, capture_output=True, env=full_env)
    return subprocess.run([sys.executable, "-m", "diffgen", *args], input=input, capture_output=True,
                          env=full_env)


def cli(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
    """The same command as :func:`run_cli`, in this process (Typer's runner): its exit code, stdout and
    stderr as a subprocess would give them, without the 3-4 s of importing torch and transformers
    again. For commands whose behaviour does not hang on the process itself: not signals, not a
    terminal, not environment variables read at import time (those go through :func:`run_cli`)."""
    from typer.testing import CliRunner

    from diffgen.cli.app import app

    result = CliRunner().invoke(app, list(args), input=input)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(["diffgen", *args], result.exit_code, result.stdout_bytes,
                                       result.stderr_bytes)


# -- a real `diffgen serve` in a subprocess ----------------------------------------------------------


def free_port() -> int:
    """A TCP port free on the loopback address right now (the OS picks it)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def hold_at_boundaries(batcher, held) -> None:
    """Make ``batcher`` wait at each canvas boundary while ``held()`` is true (it still drops
    cancelled rows and admits waiting ones there): queue states without timing. (A served
    batcher: ``serve_env``.)"""
    import time

    def at_boundary() -> bool:
        if not held():
            return False
        time.sleep(0.02)  # how often to look again, not how long to wait
        return True

    batcher._at_boundary = at_boundary


def serve_env(hold: Path) -> dict[str, str]:
    """The environment of a ``diffgen serve`` whose batcher waits at its canvas boundaries while the
    file ``hold`` says so (see tests/serve_hold/sitecustomize.py)."""
    paths = [str(Path(__file__).parent / "serve_hold"), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {"DIFFGEN_SERVE_HOLD": str(hold), "PYTHONPATH": os.pathsep.join(paths)}


class Served:
    """A running ``diffgen serve``. Attributes: ``url`` its base (``http://127.0.0.1:PORT``),
    ``process`` the Popen, ``log`` the file its stderr goes to."""

    def __init__(self, url: str, process: subprocess.Popen, log: Path):
        self.url, self.process, self.log = url, process, log

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(checkpoint: Path, log: Path, *args: str, env: dict | None = None) -> Served:
    """Start ``diffgen serve`` on a free loopback port and return once ``/health`` answers.

    Polls the port (no fixed sleep; pytest-timeout is the safety net). stderr goes to ``log``, not a
    pipe nobody reads, so a chatty server cannot block on a full pipe."""
    import time

    import httpx

    port = free_port()
    with open(log, "wb") as handle:
        process = subprocess.Popen([sys.executable, "-m", "diffgen", "serve", "-m", str(checkpoint), "--port",
                                    str(port), *args], stdout=subprocess.DEVNULL, stderr=handle,
                                   env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    while True:
        if process.poll() is not None:
            raise AssertionError(f"diffgen serve exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return Served(url, process, log)
        except httpx.TransportError:
            pass
        time.sleep(0.05)  # how often to look, not how long to wait


def stop_server(served: Served) -> None:
    if served.process.poll() is None:
        served.process.terminate()
        served.process.wait()


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    """``diffgen serve --exact`` on the tiny checkpoint, shared by a test module: answers are token for
    token those of ``diffgen run --exact`` (the batched fast path: tests/test_serve_batching.py)."""
    served = start_server(tiny_checkpoint, tmp_path_factory.mktemp("serve") / "stderr.log", "--exact")
    yield served
    stop_server(served)
