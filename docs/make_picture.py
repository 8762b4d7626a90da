"""Regenerate docs/denoising.svg (and docs/denoising.trace.jsonl): a traced run of a tiny random
model, drawn by `diffgen replay --svg`. A random model writes gibberish; the picture shows how
the denoising settles, not what it says.

    python docs/make_picture.py

To look at it: ``rsvg-convert -w 1400 docs/denoising.svg -o /tmp/denoising.png`` (librsvg2-bin).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # devtools/ beside diffgen/

HERE = Path(__file__).resolve().parent


def main() -> None:
    from devtools.tiny import save_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        # Sharpened logits and a confidence-only stop, so that each canvas stops after 13–17 of its
        # 48 steps (as the real model's typically do) and tokens settle at different steps.
        checkpoint = save_tiny_checkpoint(Path(tmp) / "tiny", canvas_length=32, logit_scale=50.0)
        trace = HERE / "denoising.trace.jsonl"
        diffgen = [sys.executable, "-m", "diffgen"]
        subprocess.run([*diffgen, "run", "-m", str(checkpoint), "--seed", "4", "-n", "96", "--entropy-bound", "5",
                        "--stability", "0", "--confidence", "0.5", "--trace", str(trace), "Why is the sky blue?"],
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run([*diffgen, "replay", str(trace), "--svg", str(HERE / "denoising.svg")], check=True)


if __name__ == "__main__":
    main()
