"""Regenerate the committed pictures: workflows/input.png (renderer), docs/grid.png (prompts x samplers) and the
controls' pictures: docs/variations.png, docs/guidance_interval.png, docs/denoised_steps.png.

    python tools/make_docs.py [--only grid,variations,guidance,steps]

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


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=PARENT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))


def _generate(out: str, *flags: str) -> list:
    """Run ``python -m <package> generate`` with ``flags``; return the written images [H, W, 3] in batch order."""
    images = __import__(f"{PKG}.models.images", fromlist=["x"])
    subprocess.run([sys.executable, "-m", PKG, "generate", "--out", out, "--no-progress", *flags], check=True,
                   env=_env(), cwd=PARENT, stdout=subprocess.DEVNULL)
    names = sorted(n for n in os.listdir(out) if n.startswith("ksampler_") and n.endswith(".png"))
    return [images.load_image(os.path.join(out, n))[0][0] for n in names]


VARIATION_PROMPTS = ("a large red circle on the left", "a green triangle in the center", "a purple cross at the top")
VARIATION_STRENGTHS = ("0", "0.1", "0.2", "0.3", "0.5", "0.7", "1")


def make_variations() -> str:
    """docs/variations.png: rows = prompts, columns = variation strength 0 .. 1 (eps model, seed 1, variation seed 2)."""
    images = __import__(f"{PKG}.models.images", fromlist=["x"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, prompt in enumerate(VARIATION_PROMPTS):
            row = []
            for j, strength in enumerate(VARIATION_STRENGTHS):
                row += _generate(os.path.join(tmp, f"{i}_{j}"), "--prompt", prompt, "--seed", "1",
                                 "--variation-seed", "2", "--variation-strength", strength, "--batch-size", "1",
                                 "--sampler", "dpmpp_2m", "--steps", "20", "--cfg", "5", "--model", "eps")
            rows.append(row)
    path = os.path.join(ROOT, "docs", "variations.png")
    images.save_png(images.image_grid(rows, pad=2), path, scale=3)
    return path


def _tuned_interval(kind: str) -> tuple:
    """The interval chosen on the tuning split by bench/guidance_interval.py (its results file)."""
    import json
    with open(os.path.join(ROOT, "bench", "results", "guidance_interval.json")) as f:
        return tuple(json.load(f)["bundled"][kind]["chosen"])


def make_guidance() -> str:
    """docs/guidance_interval.png: per prompt, cfg 1 | full cfg 8 | cfg 8 in the tuned interval (flow model)."""
    images = __import__(f"{PKG}.models.images", fromlist=["x"])
    low, high = _tuned_interval("flow")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, prompt in enumerate(PROMPTS[:4]):
            common = ("--prompt", prompt, "--seed", "3", "--batch-size", "3", "--sampler", "dpmpp_2m",
                      "--steps", "20", "--model", "flow")
            row = _generate(os.path.join(tmp, f"{i}_1"), *common, "--cfg", "1")
            row += _generate(os.path.join(tmp, f"{i}_full"), *common, "--cfg", "8")
            row += _generate(os.path.join(tmp, f"{i}_int"), *common, "--cfg", "8", "--cfg-interval", str(low),
                             str(high))
            rows.append(row)
    path = os.path.join(ROOT, "docs", "guidance_interval.png")
    images.save_png(images.image_grid(rows, pad=2), path, scale=3)
    return path


def make_steps() -> str:
    """docs/denoised_steps.png: the CLI's --preview-steps contact sheet (denoised estimate at every step)."""
    path = os.path.join(ROOT, "docs", "denoised_steps.png")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", PKG, "generate", "--prompt", "a large yellow cross at the bottom",
                        "--seed", "4", "--batch-size", "3", "--sampler", "euler_ancestral", "--steps", "12",
                        "--out", tmp, "--no-progress", "--preview-steps", path, "--scale", "2"],
                       check=True, env=_env(), cwd=PARENT, stdout=subprocess.DEVNULL)
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
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="input,grid,variations,guidance,steps")
    makers = {"input": make_input, "grid": make_grid, "variations": make_variations, "guidance": make_guidance,
              "steps": make_steps}
    for name in parser.parse_args().only.split(","):
        print(makers[name]())
