"""Print the table of a bench/gpu.sh run (its JSON files in OUT), with the weight-read floor.

    python bench/gpu_table.py OUT
"""

from __future__ import annotations

import glob
import json
import os
import sys

# Bytes a denoising step of the real model reads (DESIGN.md §5: ~49 GB in bf16).
REAL_WEIGHTS_GB = 49.0


def main() -> None:
    out = sys.argv[1]
    floor = json.load(open(os.path.join(out, "floor.json")))
    quant = os.path.join(out, "quant.txt")
    if os.path.exists(quant):
        print("\n".join(open(quant).read().strip().splitlines()[-5:]))
    rows = [json.load(open(path)) for path in sorted(glob.glob(os.path.join(out, "*_b*.json")))]
    first = rows[0]
    real = "real" in first["model"]
    floor_ms = REAL_WEIGHTS_GB / floor["copy_gbps"] * 1e3 if real else float("nan")
    print(f"\n{first['device']}; torch {first['torch']}, transformers {first['transformers']}; "
          f"d2d copy {floor['copy_gbps']:.0f} GB/s -> weight-read floor {floor_ms:.1f} ms/step "
          f"({REAL_WEIGHTS_GB:.0f} GB per step); {first['prompt_tokens']}-token prompt, "
          f"{first['canvases']} x {first['steps']} steps")
    print(f"{'sampler':<8}{'scheme':<7}{'batch':>6}{'ms/step':>9}{'x floor':>8}{'e2e ms/step':>12}{'tok/s':>9}"
          f"{'ref ms/step':>12}{'vs ref':>8}")
    for r in rows:
        ref = r.get("reference_e2e_step_ms")
        ratio = f"{r['ratio_to_reference']:.2f}" if ref else "-"
        print(f"{r['sampler']:<8}{r['scheme']:<7}{r['batch']:>6}{r['median_step_ms']:>9.2f}"
              f"{r['median_step_ms'] / floor_ms:>8.2f}{r['e2e_step_ms']:>12.2f}{r['tokens_per_s_e2e']:>9.1f}"
              f"{(f'{ref:.2f}' if ref else '-'):>12}{ratio:>8}")


if __name__ == "__main__":
    main()
