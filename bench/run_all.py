"""Run every benchmark, one after another (never side by side: they would skew each other's timings).

Usage: python bench/run_all.py [--quick]   (results: bench/results/*.json; tables on stdout)
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHES = ("model_calls.py", "import_time.py", "overhead.py", "accuracy.py", "heldout.py", "heldout_bundled.py",
           "flips.py", "adherence.py", "end_to_end.py", "unet_overhead.py", "guard.py")
FULL_FLAGS = {"heldout_bundled.py": ["--comfy-samplers", "all"]}  # the README's figures: every ComfyUI sampler
# second runs of a bench, full mode only: the tuning evidence, the second held-out draw, and both draws on 2,048
# evaluation noises (then refitted at the node's default fit size, which reads those runs' stored rows); the bundled
# networks refitted at that size, one fit per prompt (on the stored run's ComfyUI rows)
LARGE = ["--eval-noises", "2048"]
FULL_EXTRA = {"flips.py": [["--refine"], ["--shift"], ["--iterations"]],
              "heldout_bundled.py": [["--recalibrate", "--node-fit"]],
              "heldout.py": [["--second-draw"], LARGE, LARGE + ["--second-draw"],
                             LARGE + ["--recalibrate", "--node-fit"],
                             LARGE + ["--recalibrate", "--node-fit", "--second-draw"]]}
QUICK_FLAGS = {"overhead.py": ["--quick"], "accuracy.py": ["--quick"], "heldout.py": ["--quick"], "flips.py": ["--quick"],
               "heldout_bundled.py": ["--quick", "--models", "flow"],
               "import_time.py": ["--runs", "3"], "adherence.py": ["--quick"], "end_to_end.py": ["--runs", "1"],
               "unet_overhead.py": ["--repeats", "1"], "guard.py": ["--repeats", "3", "--skip-unet"]}


def main() -> int:
    quick = "--quick" in sys.argv[1:]
    failed = []
    runs = [(name, (QUICK_FLAGS if quick else FULL_FLAGS).get(name, [])) for name in BENCHES]
    if not quick:
        runs = [run for name, flags in runs for run in [(name, flags)] + [(name, x) for x in FULL_EXTRA.get(name, [])]]
    for name, flags in runs:
        cmd = [sys.executable, os.path.join(HERE, name)] + flags
        print(f"\n# {' '.join(cmd[1:])}", flush=True)
        t = time.perf_counter()
        rc = subprocess.call(cmd)
        print(f"# {name}: exit {rc}, {time.perf_counter() - t:.0f}s", flush=True)
        if rc:
            failed.append(" ".join([name] + flags))
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
