"""Import time: ``import ksampler`` and loading the folder as ComfyUI loads a custom node pack, beyond torch's own.

Each figure is the median over fresh interpreters (``-S`` is not used: site
packages load as they do for a user).  Three measurements:

* ``python -c "import torch"`` and ``python -c "import ksampler"``, wall
  time of the whole process; the difference is what the pack adds;
* in one process, torch imported first (ComfyUI has it loaded long before
  custom nodes), then the pack's folder loaded the way ComfyUI does it:
  ``importlib.util.spec_from_file_location`` on the folder's ``__init__.py``
  under another module name, ``module_from_spec``, ``exec_module``, timed
  alone.

Goal: <= 0.3 s beyond torch.  Usage: python bench/import_time.py [--runs N]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, median, require_ksampler, table, write_json  # noqa: E402

ksampler = require_ksampler()
PACK_DIR = os.path.dirname(os.path.abspath(ksampler.__file__))

COMFY_STYLE = r"""
import importlib.util, sys, time
import torch
t = time.perf_counter()
spec = importlib.util.spec_from_file_location("custom_nodes_ksampler_pack", {init!r})
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
assert module.NODE_CLASS_MAPPINGS
print(time.perf_counter() - t)
"""


def wall(code: str, env: dict) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    env = dict(os.environ)
    code = COMFY_STYLE.format(init=os.path.join(PACK_DIR, "__init__.py"))
    wall("import torch", env)  # warm the file cache
    torch_t, pack_t, comfy_t = [], [], []
    for _ in range(args.runs):  # interleaved, so that load from elsewhere hits all three alike
        torch_t.append(wall("import torch", env))
        pack_t.append(wall("import ksampler", env))
        out = subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True, text=True)
        comfy_t.append(float(out.stdout.strip().splitlines()[-1]))
    t_torch, t_pack, t_comfy = median(torch_t), median(pack_t), median(comfy_t)
    beyond = t_pack - t_torch
    rows = [["python -c 'import torch'", t_torch, "-"],
            ["python -c 'import ksampler'", t_pack, beyond],
            ["ComfyUI-style load (torch already imported)", "-", t_comfy]]
    print(table(["measurement", "median s", "beyond torch s"], rows,
                f"Import time, median of {args.runs} fresh interpreters ({PACK_DIR})"))
    worst = max(beyond, t_comfy)
    print(f"\nGoal <= 0.3 s beyond torch: {worst:.3f} s -> {'MET' if worst <= 0.3 else 'MISSED'}")
    path = write_json("import_time.json", {"environment": environment(), "runs": args.runs, "torch_s": torch_t,
                                           "ksampler_s": pack_t, "comfy_style_s": comfy_t, "beyond_torch_s": beyond,
                                           "comfy_style_median_s": t_comfy, "pack_dir": PACK_DIR})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
