"""Regenerate the committed pictures: workflows/input.png (renderer) and docs/grid.png (prompts x samplers).

    python tools/make_docs.py

The grid is made by the main command itself (``python -m <package> generate``,
one call per prompt and sampler, seed 1), then tiled and enlarged 3x.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_package() -> tuple:
    """(package name, the folder holding it): ``ksampler`` if importable, else this checkout under its folder name."""
    try:
        import ksampler
        return "ksampler", os.path.dirname(os.path.dirname(os.path.abspath(ksampler.__file__)))
    except ImportError:
        parent, name = os.path.split(ROOT)
        sys.path.insert(0, parent)
        __import__(name)
        return name, parent


PKG, PARENT = _import_package()

PROMPTS = ("a large red circle on the left", "a small blue square at the top", "a green triangle in the center",
           "a large yellow cross at the bottom", "a purple circle on the right", "a white square on a textured background")
SAMPLERS = ("euler", "euler_ancestral", "heun", "dpmpp_2m", "uni_pc")
INPUT_SCENE = "a large red circle on the left"


def make_input() -> str:
    """workflows/input.png: a renderer image for the image-to-image workflow."""
    dataset = __import__(f"{PKG}.bundled.dataset", fromlist=["x"])
    images = __import__(f"{PKG}.bundled.images", fromlist=["x"])
    scene = dataset.scene_from_prompt(INPUT_SCENE, seed=3)
    path = os.path.join(ROOT, "workflows", "input.png")
    images.save_png(dataset.render([scene])[0].permute(1, 2, 0), path)
    return path


def make_grid() -> str:
    """docs/grid.png: one image per prompt (rows) and sampler (columns), from the main command."""
    images = __import__(f"{PKG}.bundled.images", fromlist=["x"])
    env = dict(os.environ, PYTHONPATH=PARENT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, prompt in enumerate(PROMPTS):
            row = []
            for sampler in SAMPLERS:
                out = os.path.join(tmp, f"{i}_{sampler}")
                subprocess.run([sys.executable, "-m", PKG, "generate", "--prompt", prompt, "--sampler", sampler,
                                "--scheduler", "karras", "--steps", "20", "--cfg", "5", "--seed", "1",
                                "--batch-size", "1", "--out", out, "--no-progress"], check=True, env=env,
                               cwd=PARENT, stdout=subprocess.DEVNULL)
                row.append(images.load_image(os.path.join(out, "ksampler_00001_.png"))[0][0])
            rows.append(row)
    path = os.path.join(ROOT, "docs", "grid.png")
    images.save_png(images.image_grid(rows, pad=2), path, scale=3)
    return path


if __name__ == "__main__":
    print(make_input())
    print(make_grid())
