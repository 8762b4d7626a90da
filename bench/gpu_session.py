"""The whole GPU measurement of issue 18 in one process: phases, JSON after each, the table last.

Phases, in order (``--phases`` picks some; 0 and 9 always run):

0. environment: card, compute capability, SMs, driver, CUDA, torch, transformers, triton, free
   memory, and which of diffgen's A/B knobs (``DIFFGEN_*``) the installed diffgen reads at all;
1. the weight-read floor, measured in this call: device-to-device copy bandwidth (read + write)
   x the bytes one step reads (the decoder's unique weights, counted on a meta-device model);
2. one random real-size model built once (random bf16 tensors streamed through diffgen's loader:
   the encoder and decoder stacks never exist at once, DESIGN.md §5), batch 1, 64-token prompt, 16
   steps, and on that ONE build the step median and end-to-end time per step of the new path
   (``DIFFGEN_FUSED=1 DIFFGEN_GRAPHS_PER_CANVAS=0``) and of A/B toggles that change it: unfused
   (``DIFFGEN_FUSED=0``), graphs per canvas (``DIFFGEN_GRAPHS_PER_CANVAS=1``), graphs off
   (``DIFFGEN_CUDA_GRAPHS=0``), the pre-issue-18 baseline (all the old values at once: rerun in the
   same call, so an H100 has its own baseline), fused ops in torch / Triton
   (``DIFFGEN_FUSED_BACKEND``), legacy / tuned expert kernels (``DIFFGEN_MOE_CONFIG``), bf16
   experts through torch's grouped_mm / diffgen's Triton kernel (``DIFFGEN_BF16_EXPERTS``), the
   experts' unfused epilogue (``DIFFGEN_MOE_EPILOGUE``), and diffgen's defaults (knobs unset;
   also a repeat of the new path where they agree: the spread). Toggles time 2 runs, the new
   path 3, and take only the time the later phases leave them (``VARIANTS`` is in order of
   interest); ``--variants`` picks some, ``--reference eager`` adds transformers' ``generate()``.
   diffgen reads the knobs at generation time, so they are flipped between runs in this process;
   a row whose knobs the installed diffgen never reads is reported as a no-op and not run
   (``--all-variants`` runs it anyway). diffgen must key anything it keeps per process (graphs
   captured once) on these knobs, or a toggle would replay the previous variant's graphs;
3. batch 8 against batch 1 tokens/s (the new path, same build);
4. fp8, int8 and nf4 experts (and nvfp4 if ``diffgen`` knows a scheme of that name), each built
   once and run at the same settings, fp8 also with scaled activations (``DIFFGEN_FP8_SCALED=1``);
   their own floors;
5. the kernels alone: ``bench/moe_grouped.py`` (its ``run(device, tiny)`` where it has that, else
   its older signature) and ``bench/sampler_tail.py``, each imported defensively;
6. the first generation in a NEW process with this process's warm kernel caches
   (``bench/first_call.py`` with every layer of the config, timed by the child and by us);
7. ``tests/test_gpu.py`` without pytest: a tiny runner that stubs the few pytest names the tests
   use and provides ``tmp_path``, ``tmp_path_factory``, ``monkeypatch`` and conftest's fixtures;
8. kernels per step on the card: torch.profiler over the third step of a generation, graphs off,
   counting CUDA kernel events (the figure on a GPU; the 25 kernels that take the most time and
   the most launched go to the JSON), and on the same step the non-view aten ops plus Triton
   launches a dispatch mode sees, for bf16 and fp8; side by side with ``bench/kernel_count.py``
   (the CPU count under ``TRITON_INTERPRET=1``, started in the background at the session's start).
   On a CPU without the interpreter the step takes the fused ops' torch fallbacks, so a dry run's
   count is far above kernel_count.py's: only the code path is checked there;
9. the table, on stdout, last: one row per measurement, the card in the header, and the targets
   of issue 18 §5 with PASS/FAIL.

Each phase is wrapped: a failing phase logs its traceback into the JSON and the session goes on.
``gpu_session.json`` (every number), ``gpu_session.log`` (the progress printed on stderr) and
``gpu_session.txt`` (the table) are written to ``--out`` (default ``$OUT`` if set, else
``bench/results/``); the JSON after every phase, so a killed run still returns what it measured.
``--budget-s`` skips phases (and phase 2's variants) whose estimate no longer fits; SIGTERM prints
the table of what was measured and exits. Needs torch, transformers, accelerate and (on CUDA)
triton only: no pytest, typer, rich or bitsandbytes.

    python bench/gpu_session.py                                 # on the GPU machine
    python bench/gpu_session.py --config tiny --device cpu      # dry run on the CPU (1.5 min on 2 busy cores)

The device call (``run`` tool). A session has 15 minutes of device time: about 1.5 to start the
machine, then this call's 8 at most, which leaves 5 for one rerun of what failed or was skipped
(the JSON says which), even on a fresh machine once this one has gone back. The script's own
budget ends before the inner ``timeout``, which ends (SIGTERM: the table of what was measured is
still printed) before the tool's limit::

    run(command="export PYTHONUNBUFFERED=1; timeout -k 10 -s TERM 465 python3 bench/gpu_session.py --budget-s 440 --out $OUT",
        timeout_s=480)

    # the rerun, if one is needed: the phases (and phase 2 rows) the JSON marks skipped or failed, e.g.
    run(command="export PYTHONUNBUFFERED=1; timeout -k 10 -s TERM 175 python3 bench/gpu_session.py --phases 7,8 --budget-s 160 --out $OUT",
        timeout_s=190)
    # or: --phases 2 --variants 'experts: torch grouped_mm,experts: unfused epilogue' (the new path reruns with them)

then ``give_back``. What travels is the working tree (1.6 MiB on 2026-12-06; the limit is 64 MiB):
no ``carry``. An H100 is what a plain call gets; the model (47 GiB in bf16) fits either card.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import inspect
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # diffgen/, devtools/ and tests/ without installing

PHASE_NAMES = {0: "environment", 1: "weight-read floor", 2: "bf16 step, A/B toggles on one build",
               3: "batch 8 vs batch 1", 4: "quantised experts", 5: "kernels alone",
               6: "first generation, new process", 7: "GPU tests without pytest", 8: "kernels per step (profiler)",
               9: "table"}
# Seconds each phase is expected to take: (real size on an H100, tiny on a CPU). --budget-s skips by these.
# From the 2026-11 H200 run in BENCHMARKS.md (rows of 10-25 s, builds of 2-12 s), x1.4 for an H100.
# Phase 2's is its new-path row and the build; its toggles use what the later phases leave.
ESTIMATE_S = {0: (5, 2), 1: (10, 2), 2: (60, 10), 3: (30, 5), 4: (60, 10), 5: (45, 15), 6: (45, 15),
              7: (35, 10), 8: (35, 10), 9: (1, 1)}

KNOBS = ("DIFFGEN_FUSED", "DIFFGEN_GRAPHS_PER_CANVAS", "DIFFGEN_CUDA_GRAPHS", "DIFFGEN_FUSED_BACKEND",
         "DIFFGEN_MOE_CONFIG", "DIFFGEN_MOE_EPILOGUE", "DIFFGEN_BF16_EXPERTS", "DIFFGEN_FP8_SCALED")
# The path issue 18 builds (fused ops, graphs captured once per process); phases 3, 4 and 8 run it too.
# The fused ops' backend and the expert kernels' config are left to diffgen's choice here (it refuses
# DIFFGEN_FUSED_BACKEND=triton where Triton cannot run); the toggles set each explicitly.
NEW = {"DIFFGEN_FUSED": "1", "DIFFGEN_GRAPHS_PER_CANVAS": "0"}
# (label, the knobs changed from NEW; None: every knob unset), most telling first: --budget-s drops the last.
VARIANTS: tuple[tuple[str, dict[str, str] | None], ...] = (
    ("new path", {}),
    ("unfused", {"DIFFGEN_FUSED": "0"}),
    ("graphs per canvas", {"DIFFGEN_GRAPHS_PER_CANVAS": "1"}),
    ("graphs off", {"DIFFGEN_CUDA_GRAPHS": "0"}),
    ("baseline (pre-#18)", {"DIFFGEN_FUSED": "0", "DIFFGEN_GRAPHS_PER_CANVAS": "1",
                            "DIFFGEN_FUSED_BACKEND": "torch", "DIFFGEN_MOE_CONFIG": "legacy"}),
    ("fused ops in torch", {"DIFFGEN_FUSED_BACKEND": "torch"}),
    ("legacy expert config", {"DIFFGEN_MOE_CONFIG": "legacy"}),
    ("knobs unset (defaults)", None),  # what ships; also a repeat of "new path" where they agree: the spread
    ("experts: torch grouped_mm", {"DIFFGEN_BF16_EXPERTS": "torch"}),
    ("experts: unfused epilogue", {"DIFFGEN_MOE_EPILOGUE": "unfused"}),
    ("fused ops in Triton", {"DIFFGEN_FUSED_BACKEND": "triton"}),
    ("tuned expert config", {"DIFFGEN_MOE_CONFIG": "tuned"}),
    ("experts: Triton", {"DIFFGEN_BF16_EXPERTS": "triton"}),
)
# Phase 4's rows beyond one per scheme: (scheme, label, knobs changed from NEW).
SCHEME_VARIANTS = (("fp8", "scaled activations", {"DIFFGEN_FP8_SCALED": "1"}),)
TARGET_KERNELS = 1200
LOG: list[str] = []
START = time.monotonic()  # the session's budget counts from here, imports included


def log(message: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {message}"
    LOG.append(line)
    print(line, file=sys.stderr, flush=True)


class Terminated(BaseException):
    """SIGTERM (the inner ``timeout``): stop measuring, print what was measured (not an ``Exception``, so
    no phase's own error handling swallows it)."""


# ---------------------------------------------------------------------------------------------- helpers


def parse_phases(text: str) -> list[int]:
    """``"0,2-4,9"`` -> ``[0, 2, 3, 4, 9]``; 0 and 9 always run."""
    chosen = {0, 9}
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, _, high = part.partition("-")
        chosen.update(range(int(low), int(high or low) + 1))
    unknown = chosen - set(PHASE_NAMES)
    if unknown:
        raise SystemExit(f"--phases: no phase {sorted(unknown)} (phases are 0-9)")
    return sorted(chosen)


class Budget:
    """Seconds left of ``--budget-s`` since the session started (``None``: no budget)."""

    def __init__(self, seconds: float | None, start: float | None = None):
        self.seconds, self.start = seconds, time.monotonic() if start is None else start

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return float("inf") if self.seconds is None else self.seconds - self.elapsed()

    def fits(self, estimate: float) -> bool:
        return estimate <= self.left()


@contextlib.contextmanager
def knob_env(env: dict[str, str] | None):
    """Every knob of :data:`KNOBS` set as ``env`` says and the others unset; restored after."""
    saved = {k: os.environ.get(k) for k in KNOBS}
    try:
        for key in KNOBS:
            os.environ.pop(key, None)
        os.environ.update(env or {})
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def knobs_read() -> dict[str, bool]:
    """Which knobs the installed diffgen mentions anywhere in its source (the others are no-ops)."""
    text = "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in (ROOT / "diffgen").rglob("*.py"))
    return {knob: knob in text for knob in KNOBS}


def known_schemes() -> list[str]:
    """Schemes diffgen's planning or loading names (detects ``nvfp4`` rather than assuming it)."""
    names: set[str] = set()
    with contextlib.suppress(Exception):
        from diffgen.planning import plan

        names.update(plan.SCHEMES)
    for module in ("diffgen.loading.quant", "diffgen.loading"):
        with contextlib.suppress(Exception):
            mod = importlib.import_module(module)
            for attr in ("SCHEMES", "QUANT_SCHEMES", "EXPERT_SCHEMES"):
                names.update(str(s) for s in getattr(mod, attr, ()) or ())
    with contextlib.suppress(OSError):
        if any('"nvfp4"' in p.read_text(encoding="utf-8", errors="replace")
               for p in (ROOT / "diffgen" / "loading").rglob("*.py")):
            names.add("nvfp4")
    return sorted(names)


def call_accepting(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` with the keywords ``fn`` does not take dropped."""
    params = inspect.signature(fn).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    return fn(*args, **kwargs)


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        try:
            return getattr(importlib.import_module(name), "__version__", None)
        except Exception:  # noqa: BLE001
            return None


def _nvidia_smi(query: str) -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
        return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def _last_json_line(text: str) -> Any:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith(("{", "[")):
            with contextlib.suppress(ValueError):
                return json.loads(line)
    raise ValueError("no JSON line in the output")


# ---------------------------------------------------------------------------------------------- session


class Session:
    def __init__(self, args: argparse.Namespace):
        import torch

        self.args = args
        self.torch = torch
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.tiny = args.config == "tiny"
        self.budget = Budget(args.budget_s, START)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu-session-"))
        if self.tiny:
            from devtools.tiny import tiny_config

            path = self.tmp / "tiny-config.json"
            path.write_text(tiny_config().to_json_string())
            self.config = str(path)
        else:
            self.config = args.config
        self.dtype = "bfloat16" if self.cuda else "float32"
        self.loaded: Any = None
        self.loaded_scheme: str | None = None
        self.background: dict[str, Any] = {}
        self.last_env: tuple[int, str] | None = None  # (build, knobs) of the last row: see drop_runners
        self.phases: list[int] = parse_phases(args.phases)
        self.results: dict[str, Any] = {
            "session": {"argv": sys.argv[1:], "config": args.config, "device": args.device, "dtype": self.dtype,
                        "steps": args.steps, "canvases": args.canvases, "prompt_tokens": args.prompt_tokens,
                        "reps": args.reps, "batch": args.batch, "budget_s": args.budget_s,
                        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "triton_cache_dir": os.environ.get("TRITON_CACHE_DIR")},
            "phases": {}, "rows": [],
        }

    # -- bookkeeping

    def save(self) -> None:
        self.results["session"]["elapsed_s"] = round(self.budget.elapsed(), 1)
        for name, text in (("gpu_session.json", json.dumps(self.results, indent=1, default=str)),
                           ("gpu_session.log", "\n".join(LOG) + "\n")):
            tmp = self.out / (name + ".tmp")
            tmp.write_text(text)
            tmp.replace(self.out / name)

    def estimate(self, phase: int) -> float:
        real, tiny = ESTIMATE_S[phase]
        return tiny if self.tiny else real

    def run_phase(self, phase: int, fn: Callable[[], None]) -> None:
        record: dict[str, Any] = {"name": PHASE_NAMES[phase]}
        self.results["phases"][str(phase)] = record
        estimate = self.estimate(phase)
        if phase not in (0, 9) and not self.budget.fits(estimate):
            record.update(status="skipped", reason=f"budget: {self.budget.left():.0f} s left, estimate {estimate} s")
            log(f"phase {phase} ({PHASE_NAMES[phase]}): skipped, {record['reason']}")
            self.save()
            return
        log(f"phase {phase} ({PHASE_NAMES[phase]}) ...")
        start = time.monotonic()
        try:
            fn()
            record["status"] = "ok"
        except Terminated:
            record.update(status="killed", error="SIGTERM during the phase")
            raise
        except Exception as exc:  # noqa: BLE001 - one failing phase must not lose the others
            record.update(status="failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
            log(f"phase {phase} failed:\n{record['traceback']}")
        finally:
            record["seconds"] = round(time.monotonic() - start, 2)
            self.save()
        log(f"phase {phase} {record['status']} in {record['seconds']:.1f} s")

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def free(self) -> None:
        self.loaded, self.loaded_scheme = None, None
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    def model(self, scheme: str) -> Any:
        """The random model of ``scheme`` (``bf16``: unquantised), built once; the previous one is freed first."""
        if self.loaded_scheme == scheme:
            return self.loaded
        self.free()
        from diffgen.denoise import bench
        from diffgen.planning.plan import LoadPlan

        plan = LoadPlan(str(self.device), self.dtype, "none" if scheme == "bf16" else scheme)
        log(f"building the random {self.args.config} model, {scheme} ...")
        start = time.monotonic()
        loaded = bench.random_model(self.config, plan)
        self.sync()
        seconds = time.monotonic() - start
        builds = self.results.setdefault("builds", {})
        builds[scheme] = {"seconds": round(seconds, 2), "step_bytes": step_bytes(loaded.model),
                          "gpu_allocated_bytes": self.torch.cuda.memory_allocated(self.device) if self.cuda else None}
        floor = self.results.get("floor", {})
        if floor.get("copy_bytes_per_s"):
            floor.setdefault("floor_ms", {})[scheme] = builds[scheme]["step_bytes"] / floor["copy_bytes_per_s"] * 1e3
        log(f"built {scheme} in {seconds:.1f} s; a step reads {builds[scheme]['step_bytes'] / 1e9:.2f} GB")
        self.loaded, self.loaded_scheme = loaded, scheme
        return loaded

    def measure(self, label: str, scheme: str, env: dict[str, str] | None, *, phase: int, batch: int = 1,
                reps: int | None = None, reference: str | None = None, **extra: Any) -> dict[str, Any]:
        """One timed configuration on the cached build: a row of the table (``error`` if it failed)."""
        from diffgen.denoise import bench
        from diffgen.denoise.options import Execution

        row: dict[str, Any] = {"label": label, "phase": phase, "scheme": scheme, "batch": batch,
                               "env": dict(env) if env is not None else "all knobs unset",
                               "reps": reps or self.args.reps, **extra}
        loaded = self.model(scheme)
        key = (id(loaded), json.dumps(env, sort_keys=True))
        if self.last_env is not None and self.last_env[0] == key[0] and self.last_env[1] != key[1]:
            row["runners_dropped"] = drop_runners(loaded)
        self.last_env = key
        log(f"measuring {label} ...")
        start = time.monotonic()
        try:
            with knob_env(env):
                result = bench.run(loaded, steps=self.args.steps, prompt_tokens=self.args.prompt_tokens,
                                   canvases=self.args.canvases, reps=reps or self.args.reps, batch=batch,
                                   execution=Execution(exact=False),
                                   compare_reference=reference is not None, reference_cache=reference or "dynamic")
            row.update(result)
            row["e2e_over_step"] = result["e2e_step_ms"] / result["median_step_ms"]
            floor = self.results.get("floor", {}).get("floor_ms", {}).get(scheme)
            if floor:
                row["x_floor"] = result["median_step_ms"] / floor
            row["kind"] = "graphs" if result.get("graphs") and not result.get("graph_failure") else "eager"
            log(f"{label}: median step {result['median_step_ms']:.2f} ms, e2e/step {result['e2e_step_ms']:.2f} ms, "
                f"first call {result['first_call_s']:.2f} s, {result['tokens_per_s_e2e']:.0f} tok/s, {row['kind']}"
                + (f", graph failure {result['graph_failure']}" if result.get("graph_failure") else ""))
        except Exception as exc:  # noqa: BLE001 - one failing row must not lose the others
            row.update(error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
            log(f"{label} failed:\n{row['traceback']}")
        row["seconds"] = round(time.monotonic() - start, 2)
        self.results["rows"].append(row)
        self.save()
        return row

    def row(self, phase: int, label: str) -> dict[str, Any] | None:
        for row in self.results["rows"]:
            if row["phase"] == phase and row["label"] == label and "error" not in row and "skipped" not in row:
                return row
        return None

    def new_row(self) -> dict[str, Any] | None:
        """Phase 2's row of the new path (the targets' row), or failing that diffgen's defaults."""
        return self.row(2, "bf16 b1 new path") or self.row(2, "bf16 b1 knobs unset (defaults)")

    # -- phases

    def phase_environment(self) -> None:
        torch = self.torch
        env: dict[str, Any] = {
            "python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": _version("transformers"), "triton": _version("triton"),
            "accelerate": _version("accelerate"), "diffgen": _version("diffgen"),
            "knobs_read_by_diffgen": knobs_read(), "schemes_known": known_schemes(),
            "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count(),
        }
        with contextlib.suppress(Exception):
            env["git_head"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                             capture_output=True, text=True, timeout=10).stdout.strip() or None
        if self.cuda:
            props = torch.cuda.get_device_properties(self.device)
            free, total = torch.cuda.mem_get_info(self.device)
            env.update(card=torch.cuda.get_device_name(self.device),
                       compute_capability=".".join(map(str, torch.cuda.get_device_capability(self.device))),
                       multiprocessors=props.multi_processor_count,
                       l2_bytes=getattr(props, "L2_cache_size", None), memory_total_bytes=total,
                       memory_free_bytes=free, driver=_nvidia_smi("driver_version"),
                       clocks=_nvidia_smi("clocks.sm,clocks.mem,clocks.max.sm,power.limit,temperature.gpu"))
        else:
            env.update(card="cpu", compute_capability=None, driver=None, memory_free_bytes=None)
        self.results["env"] = env
        log(f"{env}")

    def phase_floor(self) -> None:
        floor = self.results.setdefault("floor", {})
        floor["copy_bytes_per_s"] = copy_bandwidth(self.torch, self.device, self.sync)
        floor["step_bytes_meta"] = meta_step_bytes(self.config)
        floor.setdefault("floor_ms", {})["bf16"] = floor["step_bytes_meta"] / floor["copy_bytes_per_s"] * 1e3
        for scheme, build in self.results.get("builds", {}).items():  # phase 1 alone after a build: rare
            floor["floor_ms"][scheme] = build["step_bytes"] / floor["copy_bytes_per_s"] * 1e3
        log(f"copy bandwidth {floor['copy_bytes_per_s'] / 1e9:.0f} GB/s; a bf16 step reads "
            f"{floor['step_bytes_meta'] / 1e9:.2f} GB -> floor {floor['floor_ms']['bf16']:.2f} ms")

    def phase_toggles(self) -> None:
        read = self.results.get("env", {}).get("knobs_read_by_diffgen") or knobs_read()
        # The toggles are the optional bulk: they leave the later phases their estimated time.
        reserve = sum(self.estimate(p) for p in self.phases if p > 2)
        wanted = [w.strip().lower() for w in (self.args.variants or "").split(",") if w.strip()]
        last = None
        for name, change in VARIANTS:
            if wanted and name != "new path" and name.lower() not in wanted:
                continue
            env = None if change is None else {**NEW, **change}
            label = f"bf16 b1 {name}"
            changed = [k for k, v in (change or {}).items() if NEW.get(k) != v or k not in NEW]
            if name not in ("new path",) and change is not None and not self.args.all_variants \
                    and not any(read.get(k) for k in changed):
                self.results["rows"].append({"label": label, "phase": 2, "scheme": "bf16", "batch": 1, "env": env,
                                             "skipped": f"no-op: diffgen reads none of {', '.join(changed)}"})
                log(f"{label}: skipped, diffgen reads none of {changed}")
                continue
            if (env or {}).get("DIFFGEN_FUSED_BACKEND") == "triton" and not self.cuda \
                    and os.environ.get("TRITON_INTERPRET") != "1":
                self.results["rows"].append({"label": label, "phase": 2, "scheme": "bf16", "batch": 1, "env": env,
                                             "skipped": "Triton kernels need CUDA (or TRITON_INTERPRET=1)"})
                continue
            graphs_off = (env or {}).get("DIFFGEN_CUDA_GRAPHS") == "0"
            estimate = (last or (20 if not self.tiny else 2)) * (2.5 if graphs_off else 1.2)
            if name != "new path" and not self.budget.fits(estimate + reserve):
                self.results["rows"].append({"label": label, "phase": 2, "scheme": "bf16", "batch": 1, "env": env,
                                             "skipped": f"budget: {self.budget.left():.0f} s left"})
                continue
            new = name == "new path"
            reference = {"eager": "dynamic", "static": "static"}.get(self.args.reference) if new else None
            row = self.measure(label, "bf16", env, phase=2, reps=None if new else max(1, self.args.reps - 1),
                               reference=reference)
            if "error" not in row and not graphs_off:
                last = row["seconds"]
        self.save()

    def phase_batch(self) -> None:
        one = self.new_row()
        if one is None:
            one = self.measure("bf16 b1 new path", "bf16", NEW, phase=3)
        many = self.measure(f"bf16 b{self.args.batch} new path", "bf16", NEW, phase=3, batch=self.args.batch)
        if "error" in one or "error" in many:
            raise RuntimeError("a batch run failed (see its row)")
        self.results["batch"] = {
            "batch": self.args.batch,
            "tokens_per_s_e2e": {"1": one["tokens_per_s_e2e"], str(self.args.batch): many["tokens_per_s_e2e"]},
            "ratio_e2e": many["tokens_per_s_e2e"] / one["tokens_per_s_e2e"],
            "ratio_canvas_step": many["tokens_per_s_canvas"] / one["tokens_per_s_canvas"],
        }
        log(f"batch {self.args.batch} vs 1: {self.results['batch']['ratio_e2e']:.2f}x tokens/s end to end")

    def phase_quantised(self) -> None:
        schemes = list(self.args.schemes)
        if "nvfp4" in self.results.get("env", {}).get("schemes_known", known_schemes()) and "nvfp4" not in schemes:
            schemes.append("nvfp4")
        capability = self.torch.cuda.get_device_capability(self.device) if self.cuda else None
        for scheme in schemes:
            label = f"{scheme} b1 new path"
            if scheme == "fp8" and capability is not None and capability < (8, 9):
                self.results["rows"].append({"label": label, "phase": 4, "scheme": scheme, "batch": 1,
                                             "skipped": f"fp8 needs compute capability 8.9+ (card {capability})"})
                continue
            if not self.budget.fits(25 if not self.tiny else 2):
                self.results["rows"].append({"label": label, "phase": 4, "scheme": scheme, "batch": 1,
                                             "skipped": f"budget: {self.budget.left():.0f} s left"})
                continue
            try:
                self.model(scheme)
            except Exception as exc:  # noqa: BLE001
                self.free()
                self.results["rows"].append({"label": label, "phase": 4, "scheme": scheme, "batch": 1,
                                             "error": f"build: {type(exc).__name__}: {exc}",
                                             "traceback": traceback.format_exc()})
                log(f"{scheme} build failed:\n{traceback.format_exc()}")
                self.save()
                continue
            self.measure(label, scheme, NEW, phase=4)
            read = self.results.get("env", {}).get("knobs_read_by_diffgen") or knobs_read()
            for base, name, change in SCHEME_VARIANTS:
                if base != scheme:
                    continue
                if not any(read.get(k) for k in change) and not self.args.all_variants:
                    self.results["rows"].append({"label": f"{scheme} b1 {name}", "phase": 4, "scheme": scheme,
                                                 "batch": 1, "skipped": f"no-op: diffgen reads none of {list(change)}"})
                elif self.budget.fits(25 if not self.tiny else 2):
                    self.measure(f"{scheme} b1 {name}", scheme, {**NEW, **change}, phase=4)

    def phase_kernels(self) -> None:
        self.free()  # a real model's worth of memory back before the kernels' own buffers
        torch = self.torch
        out = self.results.setdefault("kernels_alone", {})
        sys.path.insert(0, str(ROOT / "bench"))
        for name in ("moe_grouped", "sampler_tail"):
            start = time.monotonic()
            try:
                module = importlib.import_module(name)
                run = getattr(module, "run", None)
                if run is None:
                    out[name] = {"skipped": f"bench/{name}.py has no run()"}
                    continue
                if name == "moe_grouped":
                    if "tiny" in inspect.signature(run).parameters:
                        result = call_accepting(run, str(self.device), tiny=self.tiny)
                    elif self.tiny or not self.cuda:
                        result = call_accepting(run, str(self.device), torch.float32, schemes=("bf16", "int8", "nf4"),
                                                tokens=32, experts=8, hidden=128, inter=64, reps=2)
                    else:
                        result = call_accepting(run, str(self.device), torch.bfloat16,
                                                schemes=("bf16", "fp8", "fp8-wo", "int8", "nf4"))
                elif self.cuda and not self.tiny:
                    result = call_accepting(run, str(self.device), [1, 8], 262144, 256,
                                            paths=("triton", "fast_sampler"))
                else:
                    result = call_accepting(run, str(self.device), [1], 4096, 16, reps=2,
                                            paths=("triton", "torch", "fast_sampler"))
                out[name] = {"rows": result, "seconds": round(time.monotonic() - start, 2)}
                log(f"{name}: {json.dumps(result, default=str)[:600]}")
            except Exception as exc:  # noqa: BLE001 - bench/moe_grouped.py is being rewritten as this runs
                out[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
                log(f"{name} failed:\n{out[name]['traceback']}")
            self.save()

    def phase_first_generation(self) -> None:
        self.free()  # the child builds its own model of this size
        from diffgen.denoise import bench

        layers = self.args.first_call_layers or int(bench.random_config(self.config).text_config.num_hidden_layers)
        cache = os.environ.get("TRITON_CACHE_DIR", "")
        warm = self.cuda and any(Path(cache).rglob("*")) if cache else False
        runs = ["warm"] if warm or not self.cuda else ["cold (warms the cache)", "warm"]
        out: dict[str, Any] = {"layers": layers, "triton_cache_dir": cache, "runs": []}
        self.results["first_generation"] = out
        for which in runs:
            if not self.budget.fits(self.estimate(6)):
                out["runs"].append({"cache": which, "error": f"skipped, budget: {self.budget.left():.0f} s left"})
                continue
            command = [sys.executable, str(ROOT / "bench" / "first_call.py"), "--device", str(self.device),
                       "--config", self.config, "--layers", str(layers), "--steps", str(self.args.steps)]
            timeout = max(30.0, min(300.0, self.budget.left()))
            start = time.monotonic()
            try:
                done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ), timeout=timeout)
                wall = time.monotonic() - start
                entry = {"cache": which, "process_wall_s": round(wall, 2), "returncode": done.returncode}
                try:
                    entry.update(_last_json_line(done.stdout))
                except ValueError:
                    entry["error"] = done.stderr[-2000:] or done.stdout[-2000:]
            except subprocess.TimeoutExpired:
                entry = {"cache": which, "error": f"timed out after {timeout:.0f} s"}
            out["runs"].append(entry)
            log(f"first generation, new process, {which}: {entry}")
            self.save()
        last = out["runs"][-1]
        if "first_call_s" not in last:
            raise RuntimeError(f"the child failed: {last.get('error', '')[-400:]}")
        out["first_call_s"] = last["first_call_s"]

    def phase_tests(self) -> None:
        paths = [Path(p) if Path(p).is_absolute() else ROOT / p for p in self.args.tests]
        results = run_test_files(paths, conftest=ROOT / "tests" / "conftest.py", budget=self.budget)
        self.results["tests"] = results
        counts = {s: sum(1 for r in results if r["status"] == s) for s in ("passed", "failed", "error", "skipped")}
        log(f"GPU tests: {counts}")
        if counts["failed"] or counts["error"]:
            for r in results:
                if r["status"] in ("failed", "error"):
                    log(f"{r['test']} {r['status']}:\n{r.get('traceback', r.get('reason'))}")

    def phase_kernel_count(self) -> None:
        out = self.results.setdefault("kernel_count", {"schemes": {}})
        if "kernel_count_py" not in self.background:
            self.start_kernel_count()
        capability = self.torch.cuda.get_device_capability(self.device) if self.cuda else None
        schemes = ["bf16", "fp8"]
        if capability is not None and capability < (8, 9):
            schemes.remove("fp8")
        if self.loaded_scheme in schemes:  # the build in hand first: one build fewer
            schemes.sort(key=lambda s: s != self.loaded_scheme)
        for scheme in schemes:
            if not self.budget.fits(20 if not self.tiny else 2):
                out["schemes"][scheme] = {"skipped": f"budget: {self.budget.left():.0f} s left"}
                continue
            try:
                out["schemes"][scheme] = count_step_kernels(self, self.model(scheme))
                log(f"kernels per step, {scheme}: {_brief_counts(out['schemes'][scheme])}")
            except Exception as exc:  # noqa: BLE001
                out["schemes"][scheme] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
                log(f"kernel count {scheme} failed:\n{traceback.format_exc()}")
            self.save()
        out["kernel_count_py"] = self.finish_kernel_count()
        log(f"bench/kernel_count.py: {json.dumps(out['kernel_count_py'], default=str)[:400]}")

    def start_kernel_count(self) -> None:
        """``bench/kernel_count.py`` (CPU, ``TRITON_INTERPRET=1``), in the background while the card works."""
        script = ROOT / "bench" / "kernel_count.py"
        if not script.exists() or self.args.kernel_count_timeout <= 0:
            why = "bench/kernel_count.py does not exist yet" if not script.exists() else "--kernel-count-timeout 0"
            self.background["kernel_count_py"] = {"skipped": why}
            return
        env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "CUDA_VISIBLE_DEVICES": ""}
        for key in KNOBS:
            env.pop(key, None)
        # Files, not pipes: a full pipe would stall it until phase 8 reads it.
        stdout, stderr = self.tmp / "kernel_count.out", self.tmp / "kernel_count.err"
        with open(stdout, "w") as out, open(stderr, "w") as err:
            # Its own model: the released layer structure (2 layers under --config tiny, to fit a dry run).
            extra = ["--layers", "2", "--schemes", "bf16"] if self.tiny else ["--schemes", "bf16", "fp8", "--unfused"]
            handle = subprocess.Popen([sys.executable, str(script), *extra], stdout=out, stderr=err, env=env,
                                      cwd=str(ROOT))
        self.background["kernel_count_py"] = {"process": handle, "started": time.monotonic(), "stdout": stdout,
                                              "stderr": stderr}

    def finish_kernel_count(self) -> dict[str, Any]:
        job = self.background.get("kernel_count_py") or {}
        handle = job.get("process")
        if handle is None:
            return {k: v for k, v in job.items()}
        wait = max(1.0, min(self.args.kernel_count_timeout - (time.monotonic() - job["started"]),
                            self.budget.left() - 5))
        try:
            handle.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            handle.kill()
            handle.wait()
            return {"error": f"still running after {time.monotonic() - job['started']:.0f} s: killed"}
        stdout = job["stdout"].read_text(errors="replace")
        try:
            return {"result": _last_json_line(stdout), "seconds": round(time.monotonic() - job["started"], 1)}
        except ValueError:
            stderr = job["stderr"].read_text(errors="replace")
            return {"error": f"exit {handle.returncode}: {(stderr or stdout)[-1500:]}"}


# ---------------------------------------------------------------------------------------------- measurements


def drop_runners(loaded: Any) -> int:
    """Drop the canvas runners (their graphs and static buffers) diffgen keeps on the model between
    generations, so that a row with other knobs records its own graphs rather than replaying graphs
    recorded under the previous row's (their pool is keyed on shapes, not on DIFFGEN_FUSED & co).
    Returns how many were dropped (0 where this diffgen keeps none)."""
    pool = vars(loaded.model).pop("_diffgen_runners", None)
    count = len(pool) if hasattr(pool, "__len__") else 0
    del pool
    gc.collect()  # the graphs free their memory pools as they go
    return count


def copy_bandwidth(torch: Any, device: Any, sync: Callable[[], None]) -> float:
    """Bytes per second a device-to-device copy moves (read + write), median of 10 after 3 warm-ups;
    random bytes (METHOD.md: never time zeros), 2 GiB on CUDA."""
    n = (2 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.randint(0, 256, (n,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(13):
        sync()
        start = time.perf_counter()
        dst.copy_(src)
        sync()
        if i >= 3:
            times.append(time.perf_counter() - start)
    if not torch.equal(dst[:: 1 << 20], src[:: 1 << 20]):
        raise RuntimeError("the copy is wrong")
    del src, dst
    return 2 * n / statistics.median(times)


def meta_step_bytes(config_name: str) -> int:
    """The bytes of weights one denoising step reads in bf16, counted on a meta-device model (no memory):
    every unique parameter and buffer of the decoder, the tied embedding / lm_head included."""
    import torch
    from accelerate import init_empty_weights
    from transformers import DiffusionGemmaForBlockDiffusion

    from diffgen.denoise import bench

    with init_empty_weights(include_buffers=False):
        model = DiffusionGemmaForBlockDiffusion(bench.random_config(config_name))
    model.tie_weights()
    seen: set[int] = set()
    total = 0
    for param in model.model.decoder.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel() * torch.finfo(torch.bfloat16).bits // 8
    return total + sum(b.numel() * b.element_size() for b in model.model.decoder.buffers())


def step_bytes(model: Any) -> int:
    """Bytes of weights one step of a built model reads: every unique tensor of the decoder (the encoder
    shares them), the tied embedding / lm_head included, not the vision tower."""
    seen, total = set(), 0
    for tensor in [*model.model.decoder.parameters(), *model.model.decoder.buffers()]:
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def _third_step(session: Session, loaded: Any, window: Callable[[], contextlib.AbstractContextManager]) -> Any:
    """Run a generation (fast, graphs off) and hold ``window`` open over exactly its third step of canvas 0."""
    from dataclasses import replace

    from diffgen.denoise.bench import ordinary_token_ids
    from diffgen.denoise.loop import Execution, StepEvent, stream

    config = loaded.model.config
    vocab = int(config.text_config.vocab_size)
    canvas = int(config.canvas_length)
    settings = replace(loaded.defaults.replace(max_new_tokens=canvas, max_denoising_steps=max(4, session.args.steps),
                                               seed=0),
                       stability_threshold=None, confidence_threshold=None, eos_token_ids=(vocab + 1,))
    pool = ordinary_token_ids(config, loaded.tokenizer, vocab)
    prompt = [pool[i % len(pool)] for i in range(session.args.prompt_tokens)]
    manager = None
    with knob_env({**NEW, "DIFFGEN_CUDA_GRAPHS": "0"}):
        generation = stream(loaded, [prompt], settings, execution=Execution(exact=False, graphs=False), observe=True)
        try:
            for event in generation:
                if isinstance(event, StepEvent) and event.canvas == 0:
                    if event.step == 2:
                        session.sync()
                        manager = window()
                        value = manager.__enter__()
                    elif event.step == 3 and manager is not None:
                        session.sync()
                        done, manager = manager, None
                        done.__exit__(None, None, None)
                        return value
        finally:
            if manager is not None:  # the step raised or the generation stopped early: close the window
                manager.__exit__(None, None, None)
    raise RuntimeError("the generation ended before its third step")


def count_step_kernels(session: Session, loaded: Any) -> dict[str, Any]:
    """Kernels in the third step of a fast generation, graphs off: CUDA kernel events from torch.profiler
    (on a GPU), and the non-view aten ops + Triton launches a dispatch mode sees (anywhere)."""
    import collections

    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.utils._python_dispatch import TorchDispatchMode

    try:
        from diffgen.kernels import launches
    except ImportError:  # older diffgen: Triton launches are not counted on the host side
        launches = None
    # Warm-up: compiles Triton kernels and fills caches outside the counted step.
    _third_step(session, loaded, contextlib.nullcontext)
    result: dict[str, Any] = {}
    # On a GPU: the CUDA kernel events. On the CPU (dry runs), the leaf aten ops the profiler saw (views
    # included), so that this code runs there too and cross-checks the dispatch count.
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if session.cuda else [])
    prof = _third_step(session, loaded, lambda: profile(activities=activities))
    kernels: collections.Counter = collections.Counter()
    device_us: collections.Counter = collections.Counter()
    other = 0
    for event in prof.events():
        if session.cuda:
            if getattr(event, "device_type", None) != torch.autograd.DeviceType.CUDA:
                continue
            if event.name.startswith(("Memcpy", "Memset")):
                other += 1
                continue
        elif not event.name.startswith("aten::") or any(c.name.startswith("aten::") for c in event.cpu_children):
            continue
        kernels[event.name] += 1
        device_us[event.name] += event.time_range.elapsed_us()
    result["profiler"] = {
        "what": "CUDA kernel events" if session.cuda else "leaf aten ops on the CPU (views included)",
        "kernels": sum(kernels.values()), "memcpy_memset": other,
        "device_ms": sum(device_us.values()) / 1e3,
        "top_by_time": [{"name": n[:120], "count": kernels[n], "us": round(us, 1)}
                        for n, us in device_us.most_common(25)],
        "top_by_count": [{"name": n[:120], "count": c} for n, c in kernels.most_common(25)],
    }

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: collections.Counter = collections.Counter()
            self.triton_before = launches.total() if launches else 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            before = launches.total() if launches else 0
            out = func(*args, **(kwargs or {}))
            if getattr(func, "is_view", False) or (launches and launches.inside()):
                return out  # a view launches nothing; the interpreter's own copies are not kernels
            if getattr(func, "namespace", "aten") != "aten" and launches and launches.total() > before:
                return out  # a custom op whose Triton launches were counted (its torch ops are not seen)
            self.ops[f"{getattr(func, 'namespace', 'aten')}::{func.overloadpacket.__name__}"] += 1
            return out

    counter = _third_step(session, loaded, Count)
    triton = (launches.total() - counter.triton_before) if launches else None
    result["dispatch"] = {"aten_ops": sum(counter.ops.values()), "triton_launches": triton,
                          "kernels": sum(counter.ops.values()) + (triton or 0),
                          "top_ops": dict(counter.ops.most_common(25))}
    result["kernels"] = (result["profiler"] if session.cuda else result["dispatch"])["kernels"]
    result["source"] = "profiler, CUDA kernel events" if session.cuda else "dispatch: non-view aten ops + Triton"
    return result


def _brief_counts(entry: dict[str, Any]) -> str:
    if "kernels" not in entry:
        return entry.get("error") or entry.get("skipped") or "?"
    parts = []
    p = entry.get("profiler")
    if p and p["what"].startswith("CUDA"):
        parts.append(f"{p['kernels']} CUDA kernels, {p['device_ms']:.2f} ms on the card")
    elif p:
        parts.append(f"profiler {p['kernels']} leaf aten ops")
    d = entry["dispatch"]
    parts.append(f"dispatch {d['aten_ops']} non-view aten ops + {d['triton_launches']} Triton launches")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------- tests without pytest


class Skipped(Exception):
    pass


class _Mark:
    def __init__(self, name: str, args: tuple, kwargs: dict):
        self.name, self.args, self.kwargs = name, args, kwargs

    def __call__(self, fn: Any) -> Any:
        fn.__dict__.setdefault("_stub_marks", []).append(self)
        return fn


class _MarkGenerator:
    def __getattr__(self, name: str) -> Callable[..., Any]:
        def make(*args: Any, **kwargs: Any) -> Any:
            if len(args) == 1 and callable(args[0]) and not kwargs and name not in ("skipif", "skip"):
                return _Mark(name, (), {})(args[0])  # bare @pytest.mark.name
            return _Mark(name, args, kwargs)

        return make


class _Raises:
    def __init__(self, expected: Any, match: str | None = None):
        self.expected, self.match, self.value = expected, match, None

    def __enter__(self) -> "_Raises":
        return self

    def __exit__(self, kind: Any, value: Any, tb: Any) -> bool:
        import re

        if kind is None:
            raise AssertionError(f"DID NOT RAISE {self.expected}")
        if not issubclass(kind, self.expected):
            return False
        if self.match and not re.search(self.match, str(value)):
            raise AssertionError(f"{value!r} does not match {self.match!r}")
        self.value = value
        return True


class _Approx:
    def __init__(self, expected: Any, rel: float = 1e-6, abs: float = 1e-12):  # noqa: A002 - pytest's names
        self.expected, self.rel, self.abs = expected, rel, abs

    def __eq__(self, other: Any) -> bool:
        import math

        pairs = zip(other, self.expected) if isinstance(self.expected, (list, tuple)) else [(other, self.expected)]
        return all(math.isclose(a, b, rel_tol=self.rel, abs_tol=self.abs) for a, b in pairs)


def pytest_stub() -> Any:
    """The few names of pytest that test modules and conftest use, enough to import and run them."""
    import types

    stub = types.ModuleType("pytest")
    stub.__dict__["__gpu_session_stub__"] = True

    def fixture(fn: Any = None, *, scope: str = "function", autouse: bool = False, name: str | None = None,
                **_: Any) -> Any:
        def wrap(f: Any) -> Any:
            f._stub_fixture = {"scope": scope, "autouse": autouse, "name": name or f.__name__}
            return f

        return wrap(fn) if callable(fn) else wrap

    def skip(reason: str = "", **_: Any) -> None:
        raise Skipped(reason)

    skip.Exception = Skipped  # type: ignore[attr-defined]

    def importorskip(name: str, *_: Any, **__: Any) -> Any:
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            raise Skipped(f"could not import {name!r}: {exc}") from exc

    def fail(reason: str = "", **_: Any) -> None:
        raise AssertionError(reason)

    stub.fixture, stub.skip, stub.importorskip, stub.fail = fixture, skip, importorskip, fail
    stub.mark, stub.raises, stub.approx = _MarkGenerator(), _Raises, _Approx
    stub.param = lambda *values, **_: values
    return stub


class MonkeyPatch:
    """pytest's monkeypatch, the part tests use: setattr (object or dotted path), setenv, delenv, setitem."""

    _missing = object()

    def __init__(self):
        self._undo: list[Callable[[], None]] = []

    def setattr(self, target: Any, name: Any, value: Any = _missing, raising: bool = True) -> None:
        if value is self._missing:  # setattr("pkg.module.attr", value)
            module, _, attr = str(target).rpartition(".")
            target, name, value = importlib.import_module(module), attr, name
        old = getattr(target, name, self._missing)
        if old is self._missing and raising:
            raise AttributeError(f"{target!r} has no attribute {name!r}")
        setattr(target, name, value)
        self._undo.append(lambda: delattr(target, name) if old is self._missing else setattr(target, name, old))

    def delattr(self, target: Any, name: str, raising: bool = True) -> None:
        if not hasattr(target, name):
            if raising:
                raise AttributeError(name)
            return
        old = getattr(target, name)
        delattr(target, name)
        self._undo.append(lambda: setattr(target, name, old))

    def setenv(self, name: str, value: str, prepend: str | None = None) -> None:
        old = os.environ.get(name)
        os.environ[name] = f"{value}{prepend}{old}" if prepend and old else str(value)
        self._undo.append(lambda: os.environ.pop(name, None) if old is None else os.environ.__setitem__(name, old))

    def delenv(self, name: str, raising: bool = True) -> None:
        if name not in os.environ:
            if raising:
                raise KeyError(name)
            return
        old = os.environ.pop(name)
        self._undo.append(lambda: os.environ.__setitem__(name, old))

    def setitem(self, mapping: Any, key: Any, value: Any) -> None:
        old = mapping.get(key, self._missing)
        mapping[key] = value
        self._undo.append(lambda: mapping.pop(key, None) if old is self._missing else mapping.__setitem__(key, old))

    def chdir(self, path: Any) -> None:
        old = os.getcwd()
        os.chdir(path)
        self._undo.append(lambda: os.chdir(old))

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


class TmpPathFactory:
    def __init__(self, base: Path):
        self.base, self.count = base, 0

    def mktemp(self, name: str, numbered: bool = True) -> Path:
        self.count += 1
        path = self.base / (f"{name}{self.count}" if numbered else name)
        path.mkdir(parents=True, exist_ok=not numbered)
        return path

    def getbasetemp(self) -> Path:
        return self.base


def _load_module(path: Path, stub: Any) -> Any:
    """Import a test file by path (as ``tests.<stem>`` when it lives in tests/, so its relative names work)."""
    try:
        name = ".".join(path.resolve().relative_to(ROOT).with_suffix("").parts)
    except ValueError:
        name = f"_gpu_session_{path.stem}_{abs(hash(str(path)))}"
    if name in sys.modules and getattr(sys.modules[name], "pytest", stub) is stub:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _fixtures_of(module: Any) -> dict[str, tuple[Callable, dict]]:
    return {f._stub_fixture["name"]: (f, f._stub_fixture) for f in vars(module).values()
            if callable(f) and hasattr(f, "_stub_fixture")}


def _marks(obj: Any) -> list[_Mark]:
    marks = getattr(obj, "pytestmark", None) or []
    return list(marks if isinstance(marks, (list, tuple)) else [marks]) + list(getattr(obj, "_stub_marks", []))


def _skip_reason(marks: list[_Mark]) -> str | None:
    for mark in marks:
        if mark.name == "skip":
            return mark.kwargs.get("reason") or (mark.args[0] if mark.args else "skip")
        if mark.name == "skipif" and mark.args and not isinstance(mark.args[0], str) and mark.args[0]:
            return mark.kwargs.get("reason", "skipif")
    return None


def run_test_files(paths: list[Path], conftest: Path | None = None, budget: Budget | None = None) -> list[dict]:
    """Run pytest-style test files without pytest; one ``{test, status, seconds, ...}`` per test
    (status ``passed``, ``failed``, ``error`` (a fixture's setup failed), ``skipped``)."""
    stub = pytest_stub()
    saved = {name: sys.modules.get(name) for name in ("pytest",)}
    sys.modules["pytest"] = stub
    base = Path(tempfile.mkdtemp(prefix="gpu-session-tests-"))
    factory = TmpPathFactory(base)
    session_cache: dict[str, Any] = {}
    session_teardown: list[Callable[[], None]] = []
    results: list[dict] = []
    try:
        shared: dict[str, tuple[Callable, dict]] = {}
        if conftest is not None and conftest.exists():
            shared = _fixtures_of(_load_module(conftest, stub))
        for path in paths:
            try:
                module = _load_module(path, stub)
            except Skipped as exc:
                results.append({"test": path.name, "status": "skipped", "reason": str(exc), "seconds": 0.0})
                continue
            except Exception as exc:  # noqa: BLE001
                results.append({"test": path.name, "status": "error", "reason": f"import: {type(exc).__name__}: {exc}",
                                "traceback": traceback.format_exc(), "seconds": 0.0})
                continue
            fixtures = {**shared, **_fixtures_of(module)}
            module_cache: dict[str, Any] = {}
            module_teardown: list[Callable[[], None]] = []
            module_marks = _marks(module)
            tests = [(n, f) for n, f in vars(module).items()
                     if n.startswith("test") and inspect.isfunction(f) and f.__module__ == module.__name__]
            for name, fn in tests:
                record: dict[str, Any] = {"test": f"{path.name}::{name}"}
                results.append(record)
                reason = _skip_reason(module_marks + _marks(fn))
                if reason is None and budget is not None and budget.left() < 5:
                    reason = f"budget: {budget.left():.0f} s left"
                if reason is not None:
                    record.update(status="skipped", reason=reason, seconds=0.0)
                    continue
                function_cache: dict[str, Any] = {}
                function_teardown: list[Callable[[], None]] = []

                def get(fixture: str, chain: tuple[str, ...] = ()) -> Any:
                    if fixture in function_cache:
                        return function_cache[fixture]
                    if fixture in module_cache:
                        return module_cache[fixture]
                    if fixture in session_cache:
                        return session_cache[fixture]
                    if fixture == "tmp_path":
                        function_cache[fixture] = factory.mktemp("tmp")
                        return function_cache[fixture]
                    if fixture == "tmp_path_factory":
                        session_cache[fixture] = factory
                        return factory
                    if fixture == "monkeypatch":
                        patch = MonkeyPatch()
                        function_teardown.append(patch.undo)
                        function_cache[fixture] = patch
                        return patch
                    if fixture not in fixtures or fixture in chain:
                        raise LookupError(f"fixture {fixture!r} is not available without pytest")
                    f, meta = fixtures[fixture]
                    kwargs = {p: get(p, chain + (fixture,)) for p in inspect.signature(f).parameters}
                    value = f(**kwargs)
                    scope = meta["scope"]
                    cache, teardown = ((session_cache, session_teardown) if scope == "session" else
                                       (function_cache, function_teardown) if scope == "function" else
                                       (module_cache, module_teardown))
                    if inspect.isgenerator(value):
                        generator, value = value, next(value)
                        teardown.append(lambda g=generator: next(g, None))
                    cache[fixture] = value
                    return value

                start = time.monotonic()
                try:
                    try:
                        for fixture, (_, meta) in fixtures.items():
                            if meta["autouse"]:
                                get(fixture)
                        kwargs = {p: get(p) for p in inspect.signature(fn).parameters}
                    except Skipped as exc:
                        record.update(status="skipped", reason=str(exc))
                        continue
                    except Exception as exc:  # noqa: BLE001
                        record.update(status="error", reason=f"setup: {type(exc).__name__}: {exc}",
                                      traceback=traceback.format_exc())
                        continue
                    try:
                        fn(**kwargs)
                        record["status"] = "passed"
                    except Skipped as exc:
                        record.update(status="skipped", reason=str(exc))
                    except Exception as exc:  # noqa: BLE001
                        record.update(status="failed", reason=f"{type(exc).__name__}: {exc}"[:500],
                                      traceback=traceback.format_exc())
                finally:
                    for undo in reversed(function_teardown):
                        with contextlib.suppress(Exception):
                            undo()
                    record["seconds"] = round(time.monotonic() - start, 2)
            for undo in reversed(module_teardown):
                with contextlib.suppress(Exception):
                    undo()
    finally:
        for undo in reversed(session_teardown):
            with contextlib.suppress(Exception):
                undo()
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return results


# ---------------------------------------------------------------------------------------------- the table


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 18 §5's targets, each ``{target, value, status}`` (``PASS``, ``FAIL`` or ``n/a ...``)."""
    rows = results.get("rows", [])
    card = results.get("env", {}).get("card") or "?"
    new = next((r for r in rows if r.get("phase") == 2 and r["label"] == "bf16 b1 new path" and "median_step_ms" in r),
               None) or next((r for r in rows if r.get("phase") == 2 and "median_step_ms" in r
                              and r["label"].endswith("(defaults)")), None)
    floor = results.get("floor", {}).get("floor_ms", {}).get("bf16")
    fp8 = next((r for r in rows if r.get("scheme") == "fp8" and "median_step_ms" in r), None)
    batch = results.get("batch")
    first = results.get("first_generation", {}).get("first_call_s")
    counts = results.get("kernel_count", {}).get("schemes", {})
    out = []

    def add(target: str, value: str | None, ok: bool | None, missing: str = "n/a (not measured)") -> None:
        status = missing if ok is None else "PASS" if ok else "FAIL"
        out.append({"target": target, "value": value or "-", "status": status})

    if new and floor:
        ratio = new["median_step_ms"] / floor
        add("bf16 step <= 1.3x the floor", f"{new['median_step_ms']:.2f} ms = {ratio:.2f}x {floor:.2f} ms",
            ratio <= 1.3)
    else:
        add("bf16 step <= 1.3x the floor", None, None)
    if fp8:
        value = f"{fp8['median_step_ms']:.2f} ms"
        if "H100" in card:
            add("fp8 experts on an H100 <= 10 ms", value, fp8["median_step_ms"] <= 10.0)
        else:
            add("fp8 experts on an H100 <= 10 ms", value, None, f"n/a (card: {card})")
    else:
        add("fp8 experts on an H100 <= 10 ms", None, None)
    if batch:
        add(f"batch {batch['batch']} >= 5x batch 1 tokens/s", f"{batch['ratio_e2e']:.2f}x end to end "
            f"({batch['ratio_canvas_step']:.2f}x per step)", batch["ratio_e2e"] >= 5.0)
    else:
        add("batch 8 >= 5x batch 1 tokens/s", None, None)
    add("first generation, new process, warm caches < 5 s", f"{first:.2f} s" if first is not None else None,
        None if first is None else first < 5.0)
    if new:
        ratio = new["e2e_step_ms"] / new["median_step_ms"]
        add("end to end <= 1.1x the median step", f"{new['e2e_step_ms']:.2f} / {new['median_step_ms']:.2f} ms = "
            f"{ratio:.2f}x", ratio <= 1.1)
    else:
        add("end to end <= 1.1x the median step", None, None)
    for scheme in ("bf16", "fp8"):
        entry = counts.get(scheme, {})
        kernels = entry.get("kernels")
        add(f"kernels per step <= {TARGET_KERNELS:,}, {scheme}",
            f"{kernels:,} ({entry.get('source', '')})" if kernels is not None else None,
            None if kernels is None else kernels <= TARGET_KERNELS)
    return out


def table(results: dict[str, Any]) -> str:
    env, session = results.get("env", {}), results.get("session", {})
    floor = results.get("floor", {})
    card = env.get("card", "?")
    if env.get("compute_capability"):
        card += (f" (cc {env['compute_capability']}, {env.get('multiprocessors')} SMs, "
                 f"{(env.get('memory_free_bytes') or 0) / 2**30:.1f} GiB free), driver {env.get('driver')}")
    lines = [
        f"gpu_session: {card}, CUDA {env.get('cuda')}; torch {env.get('torch')}, "
        f"transformers {env.get('transformers')}, triton {env.get('triton')}; "
        f"diffgen {env.get('git_head') or env.get('diffgen')}",
        f"{session.get('config')} dimensions, random weights, {session.get('dtype')}; "
        f"{session.get('prompt_tokens')}-token prompt, {session.get('canvases')} canvases x {session.get('steps')} "
        f"fixed steps, fast sampler; after a warm-up call, {session.get('reps')} timed runs a row "
        f"(phase 2's toggles {max(1, (session.get('reps') or 1) - 1)}); {session.get('elapsed_s')} s",
    ]
    if session.get("config") == "tiny" or session.get("device") == "cpu":
        lines.append("DRY RUN (tiny config or CPU): the numbers check the script, the targets apply to a real card")
    if floor.get("copy_bytes_per_s"):
        fl = floor.get("floor_ms", {})
        lines.append(f"copy bandwidth {floor['copy_bytes_per_s'] / 1e9:,.0f} GB/s (read + write); floors: "
                     + ", ".join(f"{k} {v:.2f} ms" for k, v in fl.items()))
    phases = results.get("phases", {})
    lines.append("phases: " + ", ".join(f"{k} {v.get('status', '?')}"
                                        + (f" {v['seconds']:.0f}s" if "seconds" in v else "")
                                        for k, v in sorted(phases.items(), key=lambda kv: int(kv[0]))))
    for key, record in sorted(phases.items(), key=lambda kv: int(kv[0])):
        if record.get("status") in ("failed", "killed"):
            lines.append(f"  phase {key} {record['status']}: {record.get('error', '')[:200]}")
    lines += ["", f"{'measurement':<44}{'ms/step':>9}{'e2e ms':>9}{'e2e/st':>7}{'xfloor':>8}{'tok/s':>8}"
                  f"{'first s':>8}  path"]
    for row in results.get("rows", []):
        label = row["label"][:43]
        if "skipped" in row:
            lines.append(f"{label:<44}  skipped: {row['skipped'][:80]}")
        elif "error" in row:
            lines.append(f"{label:<44}  ERROR {row['error'][:90]}")
        else:
            xf = f"{row['x_floor']:.2f}" if row.get("x_floor") else "-"
            lines.append(f"{label:<44}{row['median_step_ms']:>9.2f} {row['e2e_step_ms']:>8.2f} "
                         f"{row['e2e_over_step']:>6.2f} {xf:>7} {row['tokens_per_s_e2e']:>7.0f} "
                         f"{row['first_call_s']:>7.2f}  {row['kind']}"
                         + (f", {row['graph_captures']} captures" if row.get("graph_captures") else "")
                         + (f"; generate() {row['reference_cache']} {row['reference_e2e_step_ms']:.2f} ms/step"
                            if "reference_e2e_step_ms" in row else ""))
    if results.get("batch"):
        b = results["batch"]
        lines.append(f"{'batch ' + str(b['batch']) + ' / batch 1 tokens/s':<44}{b['ratio_e2e']:>9.2f}x end to end, "
                     f"{b['ratio_canvas_step']:.2f}x per step")
    for name, entry in results.get("kernels_alone", {}).items():
        if "rows" not in entry:
            lines.append(f"{'kernels alone: ' + name:<44}  {(entry.get('error') or entry.get('skipped', ''))[:90]}")
            continue
        for r in entry["rows"] if isinstance(entry["rows"], list) else [entry["rows"]]:
            if not isinstance(r, dict):
                continue
            what = r.get("variant") or r.get("scheme") or r.get("path") or "?"
            if "batch" in r and "path" in r:
                what = f"{r['path']} B={r['batch']}"
            ms = next((r[k] for k in ("graph_ms", "median_ms", "eager_ms") if isinstance(r.get(k), (int, float))), None)
            rate = next((r[k] for k in ("gb_s", "gbps") if isinstance(r.get(k), (int, float))), None)
            error = r.get("rel_error")
            extra = r.get("skipped") or (f"rel err {error:.1e}" if isinstance(error, float) else "")
            lines.append(f"{(name + ' ' + str(what))[:43]:<44}{'' if ms is None else f'{ms:>9.3f} ms':>12}"
                         f"{'' if rate is None else f'{rate:>8.0f} GB/s':>14}  {str(extra)[:40]}")
    first = results.get("first_generation", {})
    for run in first.get("runs", []):
        if "first_call_s" in run:
            lines.append(f"{'first generation, new process, ' + run['cache']:<44}{run['first_call_s']:>9.2f} s "
                         f"(second {run.get('second_call_s', 0):.2f} s, process {run['process_wall_s']:.1f} s, "
                         f"{first['layers']} layers)")
        else:
            lines.append(f"{'first generation, new process, ' + run['cache']:<44}  ERROR {str(run.get('error'))[-90:]}")
    tests = results.get("tests")
    if tests is not None:
        counts = {s: sum(1 for t in tests if t["status"] == s) for s in ("passed", "failed", "error", "skipped")}
        lines.append(f"{'GPU tests (no pytest)':<44}  " + ", ".join(f"{v} {k}" for k, v in counts.items()))
        for t in tests:
            if t["status"] != "passed":
                lines.append(f"  {t['status']}: {t['test']}: {str(t.get('reason', ''))[:100]}")
    count = results.get("kernel_count", {})
    for scheme, entry in count.get("schemes", {}).items():
        lines.append(f"{'kernels per step, ' + scheme:<44}  {_brief_counts(entry)[:110]}")
    if "kernel_count_py" in count:
        kc = count["kernel_count_py"]
        found = kc.get("result", {}).get("schemes") if isinstance(kc.get("result"), dict) else None
        if isinstance(found, dict):
            text = "; ".join(f"{scheme} " + ", ".join(f"{k} {v}" for k, v in entry.items()
                                                      if k in ("fused", "unfused", "fused_triton_launches"))
                             for scheme, entry in found.items() if isinstance(entry, dict))
            text += f" ({kc['result'].get('layers')} layers)"
        else:
            text = json.dumps(kc.get("result", kc), default=str)
        lines.append(f"{'bench/kernel_count.py (CPU, interpreter)':<44}  {text[:120]}")
    lines += ["", "targets (issue 18 §5)"]
    for t in targets(results):
        lines.append(f"  {t['target']:<52}{t['value'][:56]:<58}{t['status']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="real", help="real, tiny, or a config.json path")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--phases", default="0-9", help="e.g. 0-4 or 2,8 (0 and 9 always run)")
    parser.add_argument("--budget-s", type=float, default=None, help="skip phases that would end after this")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "results"))
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--canvases", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=None, help="timed runs per row (default 3; 1 with --config tiny)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--schemes", nargs="*", default=["fp8", "int8", "nf4"],
                        help="phase 4's expert schemes (nvfp4 is added where diffgen knows it)")
    parser.add_argument("--all-variants", action="store_true",
                        help="run phase 2's rows whose knobs diffgen never reads")
    parser.add_argument("--variants", default="", help="phase 2's rows to run besides the new path: comma-separated "
                                                       "names from VARIANTS (e.g. 'unfused,graphs off'); default all")
    parser.add_argument("--reference", choices=("none", "eager", "static"), default="none",
                        help="also time transformers' generate() on phase 2's new-path row (static: compiled, "
                             "minutes of compiling)")
    parser.add_argument("--first-call-layers", type=int, default=0, help="phase 6's model layers (0: all)")
    parser.add_argument("--tests", nargs="*", default=["tests/test_gpu.py"], help="phase 7's test files")
    parser.add_argument("--kernel-count-timeout", type=float, default=None,
                        help="seconds for bench/kernel_count.py from the session's start (default 400; 150 with "
                             "--config tiny; 0: skip it)")
    args = parser.parse_args(argv)
    if args.reps is None:
        args.reps = 1 if args.config == "tiny" else 3
    if args.kernel_count_timeout is None:
        args.kernel_count_timeout = 150.0 if args.config == "tiny" else 400.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":  # before torch is imported: OpenMP's spinning threads only slow tiny models down
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(name, "1")
    # A cold Triton cache of this session's own: phase 2's first call pays what a new install pays, and
    # phase 6's new process finds it warm.
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="gpu-session-triton-"))

    def terminate(signum: int, frame: Any) -> None:
        raise Terminated()

    signal.signal(signal.SIGTERM, terminate)
    session = Session(args)
    phases = session.phases
    log(f"gpu_session: phases {phases}, out {session.out}, budget {args.budget_s}")
    if 8 in phases:
        session.start_kernel_count()  # CPU work (one thread): overlaps the other phases
    steps = {0: session.phase_environment, 1: session.phase_floor, 2: session.phase_toggles, 3: session.phase_batch,
             4: session.phase_quantised, 5: session.phase_kernels, 6: session.phase_first_generation,
             7: session.phase_tests, 8: session.phase_kernel_count}
    try:
        for phase in phases:
            if phase in steps:
                session.run_phase(phase, steps[phase])
    except (Terminated, KeyboardInterrupt):
        log("terminated: printing what was measured")
        session.results["session"]["terminated"] = True
    finally:
        job = session.background.get("kernel_count_py", {}).get("process")
        if job is not None and job.poll() is None:
            job.kill()
    session.results["phases"]["9"] = {"name": PHASE_NAMES[9], "status": "ok"}
    session.results["targets"] = targets(session.results)
    session.save()
    text = table(session.results)
    (session.out / "gpu_session.txt").write_text(text + "\n")
    log(f"wrote {session.out / 'gpu_session.json'}")
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
