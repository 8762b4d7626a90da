"""JSON by construction (``--schema``) vs asking for JSON in the prompt and validating, one process.

For the same schema, the same tiny random model and the same seeds, runs
(a) :func:`diffgen.denoise.constrained.schema.generate_json` and (b) a plain generation whose prompt asks
for JSON matching the schema (the schema text in the prompt, ``max_new_tokens`` = the same
positions the schema's layout takes), then checks each output with ``jsonschema``. Prints
time, decoder forward passes and how many outputs validated, per method, as a table.

A random model never writes JSON on its own, so (b)'s validity rate here says nothing about a
trained model; what the table shows is the cost of the schema path (vocabulary scan, layout,
restricted sampling) against a free generation of at most the same length (it stops at its
first EOS, so it may take fewer passes), and that (a) validates every time regardless of the model.

    python bench/schema.py [--seeds 8] [--steps 8] [--canvas-length 32]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # devtools/ beside diffgen/

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "member": {"type": "boolean"},
        "colour": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2},
    },
    "required": ["name", "age", "member", "colour", "tags"],
    "additionalProperties": False,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--canvas-length", type=int, default=32)
    args = parser.parse_args()

    import jsonschema
    import torch

    from devtools.tiny import save_tiny_checkpoint
    from diffgen.denoise.loop import generate
    from diffgen.denoise.constrained.schema import generate_json, layout, vocabulary
    from diffgen.loading.loader import load
    from diffgen.planning.plan import LoadPlan
    from diffgen.prompt import encode

    with tempfile.TemporaryDirectory() as tmp:
        path = save_tiny_checkpoint(f"{tmp}/m", seed=0, canvas_length=args.canvas_length)
        loaded = load(str(path), LoadPlan("cpu", "float32"), progress=False)
    tokenizer = loaded.tokenizer
    base = loaded.defaults.replace(max_denoising_steps=args.steps, confidence_threshold=1e-9)
    task = "Describe a club member."
    plain_prompt = encode(tokenizer, f"{task} Answer with JSON only, matching this JSON Schema:\n"
                                     f"{json.dumps(SCHEMA)}")
    schema_prompt = encode(tokenizer, task)

    start = time.perf_counter()
    vocab = vocabulary(tokenizer, int(loaded.model.config.text_config.vocab_size), base.pad_token_id)
    scan = time.perf_counter() - start
    positions = len(layout(SCHEMA, tokenizer, vocab, args.canvas_length).tokens)

    def valid(text: str) -> bool:
        try:
            jsonschema.validate(json.loads(text), SCHEMA)
        except (ValueError, jsonschema.ValidationError):
            return False
        return True

    rows = []
    for name in ("--schema", "JSON in the prompt"):
        seconds = forwards = ok = 0
        for seed in range(args.seeds):
            settings = base.replace(seed=seed)
            begin = time.perf_counter()
            if name == "--schema":
                result = generate_json(loaded, schema_prompt, SCHEMA, settings, vocab=vocab)
                text, passes = result.text, result.forwards
            else:
                out = generate(loaded, [plain_prompt], settings.replace(max_new_tokens=positions))
                text, passes = out.completions[0].text, sum(out.completions[0].stats.steps_per_canvas)
            seconds += time.perf_counter() - begin
            forwards += passes
            ok += valid(text)
        rows.append((name, seconds / args.seeds, forwards / args.seeds, ok))

    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads; tiny random model (vocab {vocab.size}, canvas {args.canvas_length}), "
          f"{args.steps} steps a canvas, adaptive stop off, {args.seeds} seeds, {positions} positions each; "
          f"vocabulary scan {scan * 1000:.0f} ms once (not in the rows)")
    print(f"{'method':<22} {'s / answer':>11} {'forwards / answer':>18} {'ms / forward':>13} {'valid':>8}")
    for name, seconds, forwards, ok in rows:
        print(f"{name:<22} {seconds:>11.3f} {forwards:>18.1f} {seconds / forwards * 1000:>13.1f} "
              f"{ok:>4}/{args.seeds:<3}")


if __name__ == "__main__":
    main()
