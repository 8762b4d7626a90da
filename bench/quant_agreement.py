"""How close each quantisation scheme stays to the unquantised model, on a tiny random checkpoint.

For every scheme: the argmax agreement and relative logit error of one decoder forward on the
same canvas (a direct measure of the quantisation error), and the share of generated tokens
that equal the unquantised model's with the same per-row seeds (sampling turns any early
difference into a different continuation, so this is the harsher number). Also the resident
weight bytes against the plan's estimate.

    python bench/quant_agreement.py [--logit-scale 1.0] [--seeds 5]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # devtools/ beside diffgen/


def measure(path: str, seeds: int = 5) -> list[dict]:
    import torch

    from diffgen.denoise.loop import generate
    from diffgen.loading.loader import load, resident_bytes
    from diffgen.planning.plan import LoadPlan, count_parameters, weight_bytes
    from diffgen.prompt import encode

    config = json.load(open(f"{path}/config.json"))
    counts = count_parameters(config)
    base = load(path, LoadPlan("cpu", "float32"), progress=False)
    prompts = ["Why is the sky blue?", "hi", "Summarise: diffusion models denoise", "one two three four"]
    ids = [encode(base.tokenizer, p) for p in prompts]
    settings = base.defaults.replace(max_new_tokens=32, max_denoising_steps=8)

    def tokens(loaded):
        out = []
        for seed in range(seeds):
            result = generate(loaded, ids, settings, seeds=[seed * 100 + i for i in range(len(ids))])
            out += [c.token_ids for c in result.completions]
        return out

    def logits(loaded):
        from transformers import DynamicCache

        from diffgen.denoise.loop import cache_keyword

        model = loaded.model
        kw = cache_keyword(model)
        torch.manual_seed(0)
        prompt = torch.tensor([ids[0]])
        cache = DynamicCache(config=model.config.get_text_config(decoder=True))
        model.model.encoder(input_ids=prompt, **{kw: cache})
        canvas = torch.randint(0, model.config.text_config.vocab_size, (1, model.config.canvas_length))
        return model(decoder_input_ids=canvas, **{kw: cache}).logits[0]

    with torch.no_grad():
        reference_tokens, reference_logits = tokens(base), logits(base)
    rows = []
    for scheme in ("int8", "fp8", "nf4", "nf4-all"):
        loaded = load(path, LoadPlan("cpu", "float32", scheme), progress=False)
        with torch.no_grad():
            out, lg = tokens(loaded), logits(loaded)
        same = sum(a == b for x, y in zip(reference_tokens, out) for a, b in zip(x, y))
        total = sum(len(x) for x in reference_tokens)
        rows.append({
            "scheme": scheme,
            "argmax_agreement": float((lg.argmax(-1) == reference_logits.argmax(-1)).float().mean()),
            "logit_rel_error": float((lg - reference_logits).norm() / reference_logits.norm()),
            "token_agreement": same / total,
            "resident_bytes": resident_bytes(loaded.model),
            "estimated_bytes": weight_bytes(counts, scheme, "float32"),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logit-scale", type=float, default=1.0)
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    from devtools.tiny import save_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        path = str(save_tiny_checkpoint(f"{tmp}/tiny", logit_scale=args.logit_scale))
        rows = measure(path, args.seeds)
    print(f"tiny random checkpoint (logit scale {args.logit_scale}), CPU fp32 reference, 4 prompts x {args.seeds} seeds")
    print(f"{'scheme':<9}{'argmax agree':>13}{'logit rel err':>15}{'token agree':>13}{'resident B':>12}{'estimate B':>12}")
    for r in rows:
        print(f"{r['scheme']:<9}{r['argmax_agreement']:>13.3f}{r['logit_rel_error']:>15.4f}{r['token_agreement']:>13.3f}"
              f"{r['resident_bytes']:>12}{r['estimated_bytes']:>12}")


if __name__ == "__main__":
    main()
