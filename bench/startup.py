"""Start-up time: `diffgen --help`, `diffgen run --help` and a TAB completion, median of runs.

    python bench/startup.py [--runs 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

CASES = [
    ("diffgen --help", ["--help"], {}),
    ("diffgen run --help", ["run", "--help"], {}),
    ("completion of `diffgen ru<TAB>`", [], {"_DIFFGEN_COMPLETE": "complete_bash", "COMP_WORDS": "diffgen ru",
                                              "COMP_CWORD": "1"}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    runs = parser.parse_args().runs
    script = os.path.join(os.path.dirname(sys.executable), "diffgen")
    command = [script] if os.path.exists(script) else [sys.executable, "-m", "diffgen"]
    print(f"{'what':<36}{'median ms':>10}{'min':>7}{'max':>7}   ({runs} runs, {' '.join(command)})")
    for label, args, env in CASES:
        full_env = {**os.environ, **env}
        subprocess.run(command + args, capture_output=True, env=full_env)  # warm the file cache
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            subprocess.run(command + args, capture_output=True, env=full_env, check=True)
            times.append((time.perf_counter() - start) * 1e3)
        print(f"{label:<36}{statistics.median(times):>10.0f}{min(times):>7.0f}{max(times):>7.0f}")


if __name__ == "__main__":
    main()
