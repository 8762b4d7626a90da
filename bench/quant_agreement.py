"""How close each quantisation scheme stays to the unquantised model, on a tiny random checkpoint.

For every scheme: the argmax agreement and relative logit error of one decoder forward on the
same canvas (a direct measure of the quantisation error), and the share of generated tokens
that equal the unquantised model's with the same per-row seeds (sampling turns any early
difference into a different continuation, so this is the harsher number). Also the resident
weight bytes against the plan's estimate.

    python bench/quant_agreement.py [--logit-scale 1.0] [--seeds 5]
    python bench/quant_agreement.py --experts 8     # real-size expert weights: nvfp4 vs nf4 vs int8 vs fp8

``--experts N``: the quantisation error of each scheme on the same N random experts of the real
model's shapes (gate_up 1408 x 2816, down 2816 x 704, bf16-rounded Gaussian weights of std 0.02 and
a Student-t (3 degrees of freedom) variant with a real checkpoint's heavy tails), both as the
weights' relative error and as the relative error of the products with random activations
(256 rows), through each scheme's own storage and dequantisation (``QuantizedStack``).
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
    from diffgen.planning.plan import LoadPlan
    from diffgen.planning.sizes import count_parameters, weight_bytes
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
    for scheme in ("int8", "fp8", "nvfp4", "nf4", "nf4-all"):
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


EXPERT_SHAPES = (("gate_up", 1408, 2816), ("down", 2816, 704))
EXPERT_SCHEMES = ("int8", "fp8", "nvfp4", "nf4")


def expert_errors(experts: int = 8, seed: int = 0) -> list[dict]:
    """Each scheme's error on the same ``experts`` random real-size expert matrices per shape."""
    import torch

    from diffgen.loading.quant import QuantizedStack

    rows = []
    generator = torch.Generator().manual_seed(seed)
    for distribution in ("gaussian", "student-t3"):
        for name, out_dim, in_dim in EXPERT_SHAPES:
            if distribution == "gaussian":
                weights = torch.randn(experts, out_dim, in_dim, generator=generator) * 0.02
            else:
                normal = torch.randn(experts, out_dim, in_dim, generator=generator)
                chi2 = torch.randn(3, experts, out_dim, in_dim, generator=generator).pow(2).sum(0)
                weights = normal / (chi2 / 3).sqrt() * 0.02 / 3 ** 0.5
            weights = weights.to(torch.bfloat16).float()  # what a bf16 checkpoint holds
            x = torch.randn(256, in_dim, generator=generator)
            for scheme in EXPERT_SCHEMES:
                stack = QuantizedStack(scheme, experts, out_dim, in_dim, torch.float32, "cpu")
                w_err = y_err = 0.0
                for index in range(experts):
                    stack.store(index, weights[index])
                    decoded = stack.weight(index)
                    w_err += float((decoded - weights[index]).norm() / weights[index].norm())
                    y = x @ weights[index].T
                    y_err += float((x @ decoded.T - y).norm() / y.norm())
                rows.append({"distribution": distribution, "matrix": f"{name} {out_dim}x{in_dim}", "scheme": scheme,
                             "weight_rel_error": w_err / experts, "product_rel_error": y_err / experts,
                             "bits_per_weight": 8 * stack_bytes(stack) / (experts * out_dim * in_dim)})
    return rows


def stack_bytes(stack) -> int:
    return sum(t.numel() * t.element_size() for t in stack.state_dict().values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logit-scale", type=float, default=1.0)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--experts", type=int, default=0,
                        help="measure the error on this many random real-size experts instead")
    args = parser.parse_args()
    if args.experts:
        rows = expert_errors(args.experts)
        print(f"{args.experts} random real-size experts per shape, CPU fp32 dequantisation")
        print("| weights | matrix | scheme | bits/weight | weight rel. error | product rel. error |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['distribution']} | {r['matrix']} | {r['scheme']} | {r['bits_per_weight']:.2f} | "
                  f"{r['weight_rel_error']:.4f} | {r['product_rel_error']:.4f} |")
        return
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
