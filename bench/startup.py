"""Wall time of `diffgen --help` (and other start-up paths): median of several runs.

    python bench/startup.py [--runs 15] [ARGS ...]      (default ARGS: --help)
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("args", nargs="*", default=["--help"])
    options = parser.parse_args()
    command = [sys.executable, "-m", "diffgen", *options.args]
    subprocess.run(command, capture_output=True, check=True)  # warm the file cache
    times = []
    for _ in range(options.runs):
        start = time.perf_counter()
        subprocess.run(command, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    print(f"`diffgen {' '.join(options.args)}`: median {statistics.median(times) * 1e3:.0f} ms, "
          f"min {min(times) * 1e3:.0f} ms, max {max(times) * 1e3:.0f} ms over {options.runs} runs")


if __name__ == "__main__":
    main()
