"""Run ../shared/comfyui/parity.py with a patch applied to the host first (in the same process).

    /tmp/comfy/venv/bin/python tools/parity_with_host_patch.py PATCH.py [parity.py arguments ...]

PATCH.py is a file kept outside this repository that defines ``install()``, called once ComfyUI is imported and
before parity.py runs: for example one that adds a sampler of a newer ComfyUI (``cfgpp_ud10_ab``) to the January
2026 checkout, so that the built-in KSampler runs the upstream function and our node can be compared with it.
Nothing of ComfyUI or of the patch is in this file. COMFY_HARNESS overrides where ../shared/comfyui is.
"""
from __future__ import annotations

import importlib.util
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = os.environ.get("COMFY_HARNESS") or os.path.join(os.path.dirname(ROOT), "shared", "comfyui")


def main() -> None:
    if len(sys.argv) < 2 or not os.path.isfile(sys.argv[1]):
        raise SystemExit(__doc__)
    patch_file, rest = sys.argv[1], sys.argv[2:]
    sys.path.insert(0, HARNESS)
    import harness_env
    harness_env.bootstrap_comfy(harness_env.env_path("COMFYUI_DIR"), harness_env.env_path("COMFY_MODELS"))
    spec = importlib.util.spec_from_file_location("host_patch", patch_file)
    patch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(patch)
    patch.install()
    sys.argv = [os.path.join(HARNESS, "parity.py")] + rest
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
