"""The real CLI with --show-steps inside tmux: the pane ends with the answer and no stray escapes."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys

import pytest

from diffgen.denoise.loop import generate
from diffgen.prompt import encode

TMUX = shutil.which("tmux")
if TMUX is None:
    if os.environ.get("CI"):
        raise RuntimeError("tmux is missing: .ci/run installs it")
    pytest.skip("tmux is not installed", allow_module_level=True)

PROMPT = "Why is the sky blue?"


def printable_seed(loaded, **settings):
    """A seed whose answer is non-empty printable text (a random model can emit control bytes)."""
    ids = encode(loaded.tokenizer, PROMPT)
    for seed in range(40):
        text = generate(loaded, [ids], loaded.defaults.replace(seed=seed, **settings)).completions[0].text
        if text.isprintable() and sum(c.isalnum() for c in text) >= 3:
            return seed, text
    pytest.fail("no seed in 0..39 gives a printable answer with some letters")


@pytest.mark.parametrize("width", [40, 100])
def test_show_steps_in_tmux(tiny, tiny_checkpoint, tmp_path, width):
    seed, answer = printable_seed(tiny, max_new_tokens=32, max_denoising_steps=6)
    socket = f"diffgen-test-{os.getpid()}-{width}"
    # When the run is over the pane signals a tmux channel, then idles until kill-server below.
    command = (
        f"{shlex.quote(sys.executable)} -m diffgen run -m {shlex.quote(str(tiny_checkpoint))} --show-steps "
        f"--seed {seed} -n 32 --steps 6 {shlex.quote(PROMPT)}; echo __DONE__ $?; "
        f"{shlex.quote(TMUX)} -L {socket} wait-for -S done; exec sleep 100000"
    )
    env = {k: v for k, v in os.environ.items() if k not in {"NO_COLOR", "TMUX"}}
    subprocess.run([TMUX, "-L", socket, "new-session", "-d", "-x", str(width), "-y", "40", command],
                   check=True, env=env)
    try:
        # Blocks until the pane signals (a signal sent before this call is not lost: tmux marks
        # the channel woken). No deadline: pytest-timeout is the safety net.
        subprocess.run([TMUX, "-L", socket, "wait-for", "done"], check=True)
        pane = subprocess.run([TMUX, "-L", socket, "capture-pane", "-p", "-J", "-S", "-200"],
                              capture_output=True, text=True, check=True).stdout
        assert "__DONE__ 0" in pane, pane
        assert "committed after 6 steps" in pane and "tok/s" in pane  # the live view's last frame
        assert "\x1b" not in pane and "^[" not in pane and "[?25" not in pane and "\x07" not in pane
        lines = pane.splitlines()
        done = next(i for i, line in enumerate(lines) if line.startswith("__DONE__"))
        assert lines[done - 1].rstrip() == answer  # stdout's answer, right before the exit marker
    finally:
        subprocess.run([TMUX, "-L", socket, "kill-server"], capture_output=True)
