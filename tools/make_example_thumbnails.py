"""Render the .jpg thumbnails of example_workflows/ with the pack's bundled model.

    PYTHONPATH=<folder holding ksampler> python tools/make_example_thumbnails.py [--out example_workflows]

Runs the bundled graphs of workflows/ (text-to-image: a 2x2 grid of its 4 images; image-to-image: the input beside
the result), enlarges them (nearest neighbour, the model draws 32x32) and saves one JPEG per example workflow. The
standard-node examples (for a user's own SD checkpoint) get the thumbnail of the bundled graph of the same kind.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIDE = 256   # thumbnail height in pixels


def run_workflow(name: str, out_dir: str) -> list:
    """The images a workflow of workflows/ saves, as PIL images in saving order."""
    from PIL import Image

    from ksampler.workflow import Executor, load_workflow
    path = os.path.join(ROOT, "workflows", name)
    executor = Executor()
    executor.run(load_workflow(path), context={"KSAMPLER_BASE_DIR": os.path.dirname(path),
                                                "KSAMPLER_OUTPUT_DIR": out_dir})
    files = [os.path.join(out_dir, image["subfolder"], image["filename"])
             for ui in executor.ui.values() for image in ui.get("images", ())]
    return [Image.open(f).convert("RGB") for f in files]


def tile(images: list, columns: int, side: int):
    """Images of one size on a grid, each enlarged to side x side (nearest neighbour)."""
    from PIL import Image
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * side, rows * side))
    for k, image in enumerate(images):
        sheet.paste(image.resize((side, side), Image.NEAREST), ((k % columns) * side, (k // columns) * side))
    return sheet


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "example_workflows"))
    args = ap.parse_args(argv)
    from PIL import Image
    with tempfile.TemporaryDirectory() as scratch:
        text = tile(run_workflow("text_to_image.json", os.path.join(scratch, "t2i"))[:4], 2, SIDE // 2)
        source = Image.open(os.path.join(ROOT, "workflows", "input.png")).convert("RGB")
        result = run_workflow("image_to_image.json", os.path.join(scratch, "i2i"))[0]
        image = tile([source, result], 2, SIDE)
    os.makedirs(args.out, exist_ok=True)
    for name, thumb in (("text_to_image", text), ("bundled_text_to_image", text), ("image_to_image", image),
                        ("bundled_image_to_image", image)):
        path = os.path.join(args.out, name + ".jpg")
        thumb.save(path, quality=90)
        print(path, thumb.size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
