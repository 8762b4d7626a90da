"""Kernels per fast denoising step at the released model's layer structure, counted on the CPU.

A GPU step costs a few microseconds per kernel launch however little each kernel does, so the
number of kernels in one step is a property of the code worth holding (issue: at most 1,200).
It is counted without a GPU: the step runs under ``TRITON_INTERPRET=1``, so it takes the very
Triton kernels it takes on CUDA (:mod:`diffgen.kernels.fused`, the sampler, the grouped experts),
and every kernel is counted once:

* each Triton launch (:mod:`diffgen.kernels.launches`, which every launch site reports to);
* each non-view aten op outside a Triton launch (a ``TorchDispatchMode``): one kernel on a GPU,
  except those that launch none there (:data:`NOT_KERNELS`: allocations and metadata-only ops).

The model is random with the released structure: 30 layers (five sliding-window layers then a
full-attention one, five times), 128 experts, top-8, and small widths (widths change no count, nor
does the number of experts: each grouped product is one launch whatever its grid; ``--experts 16``
counts the same 193 kernels at 6 layers as 128 do, in two thirds of the time under the interpreter).
The third step of a generation is counted (the first has no self-conditioning; graphs off: a
replayed graph holds exactly these kernels). ``--unfused`` also counts transformers' modules
(``DIFFGEN_FUSED=0``): the count before the fused step.

    python bench/kernel_count.py                      # one JSON line
    python bench/kernel_count.py --schemes bf16 fp8 int8 --unfused
    python bench/kernel_count.py --layers 6 12 --experts 16   # one JSON line per layer count
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # diffgen/ and devtools/ without installing

TARGET = 1200
#: aten ops that launch no kernel on a GPU: allocations (``torch.empty`` reserves memory from the
#: caching allocator) and ops that only make a new tensor header over the same memory.
NOT_KERNELS = frozenset({"aten.empty", "aten.empty_like", "aten.empty_strided", "aten.new_empty",
                         "aten.new_empty_strided", "aten._unsafe_view", "aten.lift_fresh"})
RELEASED = {
    "num_hidden_layers": 30,
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 5,
    "num_experts": 128,
    "top_k_experts": 8,
}


def build(directory: Path, layers: int = 30, experts: int = RELEASED["num_experts"]) -> Path:
    """A random checkpoint with the released layer structure (``layers`` of it) and tiny widths."""
    from devtools.tiny import save_tiny_checkpoint

    structure = dict(RELEASED, num_hidden_layers=layers, layer_types=RELEASED["layer_types"][:layers],
                     num_experts=experts)
    return save_tiny_checkpoint(directory, **structure)


class Counter:
    """Counts kernels: non-view aten ops outside Triton launches, plus Triton launches."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        from diffgen.kernels import launches

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = str(func.overloadpacket)
                if not launches.inside() and not func.is_view and name not in NOT_KERNELS:
                    counter.ops[name] = counter.ops.get(name, 0) + 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        self.ops: dict[str, int] = {}
        self.launches = 0
        self._start = 0

    def __enter__(self):
        from diffgen.kernels import launches

        self._start = launches.total()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        from diffgen.kernels import launches

        self.mode.__exit__(*exc)
        self.launches = launches.total() - self._start

    @property
    def aten(self) -> int:
        return sum(self.ops.values())

    @property
    def total(self) -> int:
        return self.aten + self.launches


def count_step(loaded, *, fused: bool, step: int = 3) -> Counter:
    """Kernels of step ``step`` of the first canvas of a one-prompt fast generation."""
    import torch

    from diffgen.denoise.loop import Execution, StepEvent, stream

    os.environ["DIFFGEN_FUSED"] = "1" if fused else "0"
    settings = loaded.defaults.replace(max_new_tokens=loaded.model.config.canvas_length, max_denoising_steps=step + 1,
                                       seed=1, stability_threshold=0)
    counter = Counter()
    with torch.no_grad():
        generation = iter(stream(loaded, [[2, 20, 30, 40, 50, 60, 70, 80]], settings,
                                 execution=Execution(exact=False, graphs=False)))
        for event in generation:
            if isinstance(event, StepEvent) and event.step == step - 1:
                with counter:
                    next(generation)
                break
    return counter


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schemes", nargs="+", default=["bf16", "fp8"], help="bf16, fp8, int8 (expert storage)")
    parser.add_argument("--unfused", action="store_true", help="also count transformers' modules (DIFFGEN_FUSED=0)")
    parser.add_argument("--layers", type=int, nargs="+", default=[30],
                        help="layers of the released structure (default all 30); several: one JSON line each")
    parser.add_argument("--experts", type=int, default=RELEASED["num_experts"],
                        help=f"experts per layer (default {RELEASED['num_experts']}, as released; counts do not change)")
    parser.add_argument("--ops", action="store_true", help="also list the aten ops by name")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    reports = [count_layers(layers, args) for layers in args.layers]
    os.environ.pop("DIFFGEN_FUSED", None)
    return reports[-1]


def count_layers(layers: int, args: argparse.Namespace) -> dict:
    """One JSON line (printed and returned): kernels per fast step at ``layers`` layers, per scheme."""
    import torch

    from diffgen.loading.loader import load
    from diffgen.planning.plan import LoadPlan

    report: dict = {"layers": layers, "experts": args.experts, "target": TARGET,
                    "triton_interpret": os.environ.get("TRITON_INTERPRET"), "torch": torch.__version__, "schemes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = build(Path(tmp) / "ckpt", layers, args.experts)
        for scheme in args.schemes:
            quant = "none" if scheme == "bf16" else scheme
            loaded = load(str(checkpoint), LoadPlan("cpu", "bfloat16", quant=quant), progress=False)
            row: dict = {}
            for fused in ([True, False] if args.unfused else [True]):
                counter = count_step(loaded, fused=fused)
                name = "fused" if fused else "unfused"
                row[name] = counter.total
                row[f"{name}_triton_launches"] = counter.launches
                row[f"{name}_aten_ops"] = counter.aten
                if args.ops:
                    row[f"{name}_ops"] = dict(sorted(counter.ops.items(), key=lambda kv: -kv[1]))
            report["schemes"][scheme] = row
            del loaded
    print(json.dumps(report), flush=True)
    return report


if __name__ == "__main__":
    main()
