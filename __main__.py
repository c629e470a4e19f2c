"""Command line: ``python -m ksampler generate ...`` (txt2img / img2img with the bundled model) and ``run WORKFLOW``."""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
from typing import Optional

from .validation import MAX_SEED, KSamplerInputError
from .workflow import SEED_CONTROLS, next_seed

__all__ = ["main", "build_parser"]


def _seed(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_SEED}, got {value}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .samplers import SAMPLERS
    from .schedulers import SCHEDULERS
    parser = argparse.ArgumentParser(prog="python -m ksampler",
                                     description="Sample the bundled text-to-image model with the ksampler KSampler, "
                                                 "or run a ComfyUI API-format workflow of this pack's nodes.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="text-to-image (or image-to-image with --init-image)")
    g.add_argument("--prompt", required=True, help='e.g. "a large red circle on the left"')
    g.add_argument("--negative", default="", help="negative prompt (default: empty)")
    g.add_argument("--sampler", default="dpmpp_2m", metavar="NAME",
                   help="sampler name (default dpmpp_2m); one of: " + ", ".join(SAMPLERS))
    g.add_argument("--scheduler", default="karras", metavar="NAME",
                   help="scheduler name (default karras); one of: " + ", ".join(SCHEDULERS))
    g.add_argument("--steps", type=_positive_int, default=20)
    g.add_argument("--cfg", type=float, default=5.0)
    g.add_argument("--seed", type=_seed, default=1, help="noise seed, 0..2^64-1 (default 1)")
    g.add_argument("--batch-size", type=_positive_int, default=4)
    g.add_argument("--width", type=_positive_int, default=None, help="multiple of 16, at most 512 (default 32)")
    g.add_argument("--height", type=_positive_int, default=None, help="multiple of 16, at most 512 (default 32)")
    g.add_argument("--model", choices=("eps", "flow"), default=None,
                   help="bundled checkpoint (default flow: it meets the adherence targets and keeps img2img "
                        "inputs far better)")
    g.add_argument("--init-image", default=None, help="image-to-image: start from this image")
    g.add_argument("--denoise", type=float, default=None,
                   help="fraction of the schedule to run (default 1.0, or 0.6 with --init-image)")
    g.add_argument("--runs", type=_positive_int, default=1, help="number of runs (queue presses)")
    g.add_argument("--control-after-generate", choices=SEED_CONTROLS, default="fixed",
                   help="how the seed changes between runs, as the editor's seed widget (default fixed); "
                        "randomize draws from a generator seeded with --seed, so it is reproducible")
    g.add_argument("--out", default="out", help="output folder (default out/)")
    g.add_argument("--prefix", default="ksampler", help="file name prefix (default ksampler)")
    g.add_argument("--scale", type=_positive_int, default=1,
                   help="save PNGs enlarged this many times (nearest), at most 16")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    c = g.add_argument_group("controls (all off by default: the plain KSampler's images)")
    c.add_argument("--variation-seed", type=_seed, default=None,
                   help="a second seed whose noise is mixed in (A1111-style variations)")
    c.add_argument("--variation-strength", type=float, default=0.0,
                   help="0..1, variance-preserving: 0 = the seed's image, 1 = the variation seed's (default 0)")
    c.add_argument("--cfg-interval", type=float, nargs=2, metavar=("SIGMA_LOW", "SIGMA_HIGH"), default=None,
                   help="apply cfg only while SIGMA_LOW <= sigma <= SIGMA_HIGH, cfg 1 (no negative pass) outside "
                        "(Kynkaanniemi et al. 2024)")
    c.add_argument("--cfg-ramp-end", type=float, default=None,
                   help="ramp cfg linearly from --cfg at the first step to this value at the last")
    c.add_argument("--cfg-stop-at", type=float, default=1.0,
                   help="fraction of the steps after which cfg is 1 (default 1: never)")
    c.add_argument("--sampler-option", action="append", default=[], metavar="NAME=VALUE",
                   help="an option of the sampler, repeatable: eta=0.5, s_noise=1.02, s_churn=0.3, "
                        "solver_type=ODE (er_sde), restart_k=3 ...")
    c.add_argument("--preview-steps", default=None, metavar="PNG",
                   help="also write a contact sheet of the denoised estimate at every step (rows: images, "
                        "columns: steps)")

    k = g.add_argument_group("calibration (few steps: a schedule and solver fitted to this prompt once)")
    k.add_argument("--calibrate", nargs="?", const="", default=None, metavar="FILE.safetensors",
                   help="sample with a calibration fitted to this model, prompt, negative, size, steps and cfg "
                        "instead of --sampler/--scheduler (text-to-image only; see the README's Calibration); with "
                        "FILE, loaded from it when it holds this calibration, else fitted and saved there")
    k.add_argument("--calibrate-iterations", type=int, default=100,
                   help="the fit's optimiser iterations (default 100, the node's; more fit closer and take longer)")

    r = sub.add_parser("run", help="run a ComfyUI API-format workflow JSON made of this pack's nodes")
    r.add_argument("workflow", help="e.g. workflows/text_to_image.json")
    r.add_argument("--out", default="out", help="output folder for save nodes (default out/)")
    r.add_argument("--runs", type=_positive_int, default=1)
    r.add_argument("--control-after-generate", choices=SEED_CONTROLS, default="fixed")
    return parser


def _check_generate(args) -> None:
    from .bundled.images import check_file_prefix, check_output_folder
    from .bundled.nodes import MAX_SCALE, MAX_SIZE, SIZE_MULTIPLE
    from .sampling_pass import check_sampler_args
    check_sampler_args(steps=args.steps, cfg=args.cfg, sampler_name=args.sampler, scheduler=args.scheduler)
    if args.denoise is not None and not 0.0 <= args.denoise <= 1.0:
        raise KSamplerInputError(f"--denoise: must be between 0 and 1, got {args.denoise}")
    if args.denoise is not None and args.denoise < 1.0 and args.init_image is None:
        raise KSamplerInputError("--denoise: below 1 needs --init-image (image-to-image); without an input image "
                                 "there is nothing to keep")
    for name in ("width", "height"):
        value = getattr(args, name)
        if value is not None and value % SIZE_MULTIPLE:
            raise KSamplerInputError(f"--{name}: must be a multiple of {SIZE_MULTIPLE}, got {value}")
        if value is not None and value > MAX_SIZE:   # Empty Latent Image (ksampler)'s maximum
            raise KSamplerInputError(f"--{name}: at most {MAX_SIZE} (the bundled model is trained at 32), got {value}")
    if args.scale > MAX_SCALE:   # Save Image (ksampler)'s maximum
        raise KSamplerInputError(f"--scale: at most {MAX_SCALE}, got {args.scale}")
    check_file_prefix("--prefix", args.prefix)
    if os.path.basename(args.prefix) != args.prefix:
        raise KSamplerInputError(f"--prefix: a file name prefix without folders, got {args.prefix!r}; give the "
                                 "folder with --out")
    if args.preview_steps is not None:
        _check_preview_path(args.preview_steps)
    check_output_folder("--out", args.out)
    if args.batch_size > 256:
        raise KSamplerInputError(f"--batch-size: at most 256, got {args.batch_size}")
    if not 0.0 <= args.variation_strength <= 1.0:
        raise KSamplerInputError(f"--variation-strength: must be between 0 and 1, got {args.variation_strength}")
    if args.variation_strength > 0 and args.variation_seed is None:
        raise KSamplerInputError("--variation-strength: needs --variation-seed")
    if args.calibrate is not None:
        _check_calibrate(args)


def _check_preview_path(path: str) -> None:
    from .bundled.images import check_output_folder
    if not path or "\0" in path or os.path.splitext(path)[1].lower() != ".png":
        raise KSamplerInputError(f"--preview-steps: expected the path of a .png file, got {path!r}")
    if os.path.isdir(path):
        raise KSamplerInputError(f"--preview-steps: {path!r} is a folder; give the path of a .png file")
    check_output_folder("--preview-steps", os.path.dirname(os.path.abspath(path)))


def _preview_path(path: str, run: int, runs: int) -> str:
    """The contact sheet's path of one run: ``sheet.png``, or ``sheet_1.png``, ``sheet_2.png`` ... for several."""
    if runs == 1:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}_{run + 1}{ext}"


def _check_calibrate(args) -> None:
    from .calibration import check_calibration_path
    from .validation import check_int
    if args.init_image is not None or (args.denoise is not None and args.denoise < 1.0):
        raise KSamplerInputError("--calibrate: calibrations are for text-to-image (denoise 1); drop --init-image and "
                                 "--denoise, or --calibrate")
    if args.sampler_option or args.cfg_interval or args.cfg_ramp_end is not None or args.cfg_stop_at != 1.0:
        raise KSamplerInputError("--calibrate: the fit is for this constant cfg and its own solver; drop "
                                 "--sampler-option and the cfg schedule flags (--cfg-interval, --cfg-ramp-end, "
                                 "--cfg-stop-at), or --calibrate")
    if args.steps > 100:
        raise KSamplerInputError(f"--steps: a calibration fits at most 100 steps, got {args.steps}")
    check_int("--calibrate-iterations", args.calibrate_iterations, 0, 5000)
    if args.calibrate:
        check_calibration_path("--calibrate", args.calibrate)


def _controls(args) -> dict:
    """ksample keyword arguments for the control flags (empty when none is given)."""
    from .conditioning import GuidanceSchedule
    from .samplers.options import parse_options, resolve_sampler_options
    kw = {}
    if args.variation_seed is not None and args.variation_strength > 0:
        kw.update(variation_seed=args.variation_seed, variation_strength=args.variation_strength)
    low, high = args.cfg_interval if args.cfg_interval else (0.0, 10000.0)
    try:
        schedule = GuidanceSchedule.from_inputs(low, high, "linear" if args.cfg_ramp_end is not None else "constant",
                                                1.0 if args.cfg_ramp_end is None else args.cfg_ramp_end,
                                                args.cfg_stop_at)
    except KSamplerInputError as e:
        flag = {"cfg_sigma_min": "--cfg-interval", "cfg_sigma_max": "--cfg-interval", "cfg_ramp_end": "--cfg-ramp-end",
                "cfg_stop_at": "--cfg-stop-at"}
        text = str(e)
        for name, option in flag.items():
            text = text.replace(name, option, 1) if text.startswith(name) else text
        raise KSamplerInputError(text) from None
    if schedule is not None:
        kw["guidance_schedule"] = schedule
    if args.sampler_option:
        options = parse_options(args.sampler_option)
        resolve_sampler_options(args.sampler, options)
        kw["sampler_options"] = options
    return kw


class _StepSheet:
    """Collects the denoised estimate of every step and writes them as one contact sheet (rows: images)."""

    def __init__(self, path: str, vae, latent_format):
        self.path, self.vae, self.fmt = path, vae, latent_format
        self.frames: list = []

    def __call__(self, step, denoised, x, total):
        self.frames.append(denoised.detach().float().cpu().clone())

    def write(self, scale: int) -> str:
        from .bundled.images import image_grid, save_png
        decoded = [self.vae.decode(self.fmt.process_out(frame)) for frame in self.frames]
        rows = [[images[k] for images in decoded] for k in range(decoded[0].shape[0])]
        return save_png(image_grid(rows), self.path, scale=scale)


class _Progress:
    """A tqdm bar over the sampler's steps (the ComfyUI-style callback drives it)."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, desc=desc, unit="step", leave=True, file=sys.stderr)

    def __call__(self, step, denoised, x, total):
        if self.bar is not None:
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


class _FitProgress:
    """A tqdm bar over a calibration fit's iterations (``fit_calibration``'s progress drives it)."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar = enabled, None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, desc="calibration fit", unit="it", leave=True, file=sys.stderr)
        self.bar.total = total
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def generate(args) -> list:
    """Run ``generate``; returns [(path, seed, batch_index)] of the written images."""
    import torch

    from .bundled import DEFAULT_KIND, load_bundled
    from .bundled.images import load_image, next_free_path, resize_image, save_png
    from .samplers.reference import default_reference_mode
    from .pipeline import ksample

    _check_generate(args)
    kind = args.model or DEFAULT_KIND
    model, clip, vae = load_bundled(kind)
    unknown = clip.tokenizer.unknown_words(args.prompt + " " + args.negative)
    if unknown:
        print(f"warning: words outside the model's vocabulary are ignored: {', '.join(dict.fromkeys(unknown))}",
              file=sys.stderr)
    positive, negative = clip.encode(args.prompt), clip.encode(args.negative)
    size = model.config.get("image_size", 32)
    denoise = args.denoise if args.denoise is not None else (0.6 if args.init_image else 1.0)
    if args.init_image:
        try:
            image, _ = load_image(args.init_image)
        except (FileNotFoundError, ValueError) as e:
            raise KSamplerInputError("--init-image: " + str(e).replace("image: ", "", 1)) from None
        width, height = args.width or size, args.height or size
        image = resize_image(image, width, height)
        samples = vae.encode(image).repeat(args.batch_size, 1, 1, 1)
    else:
        width, height = args.width or size, args.height or size
        samples = torch.zeros(args.batch_size, 3, height, width)
    latent = {"samples": samples}
    rng = random.Random(args.seed)   # randomize: reproducible from the starting seed
    seed, written = args.seed, []
    controls = _controls(args)
    if args.calibrate is not None:
        from .calibration import calibrate
        fit_bar = _FitProgress(not args.no_progress)
        try:
            controls["calibration"] = calibrate(model, positive, negative, latent, args.steps, args.cfg,
                                                iterations=args.calibrate_iterations, path=args.calibrate or None,
                                                log=lambda message: print(message, file=sys.stderr, flush=True),
                                                progress=fit_bar)
        except ValueError as exc:
            raise KSamplerInputError("--calibrate: " + str(exc).replace("calibration_file: ", "", 1)) from exc
        finally:
            fit_bar.close()
    for run in range(args.runs):
        progress = _Progress(args.steps, f"run {run + 1}/{args.runs} seed {seed}", not args.no_progress)
        callback, sheet = progress, None
        if args.preview_steps:
            sheet = _StepSheet(_preview_path(args.preview_steps, run, args.runs), vae, model.latent_format)

            def progress_and_sheet(step, denoised, x, total, sheet=sheet, progress=progress):
                progress(step, denoised, x, total)
                sheet(step, denoised, x, total)
            callback = progress_and_sheet
        try:
            out = ksample(model, seed, args.steps, args.cfg, args.sampler, args.scheduler, positive, negative,
                          latent, denoise, callback=callback, reference_mode=default_reference_mode(),
                          preview="denoised" if sheet else "default", **controls)
        finally:
            progress.close()
        if sheet is not None and sheet.frames:
            print(f"{sheet.write(args.scale)}  denoised estimate per step ({len(sheet.frames)} steps)", flush=True)
        images = vae.decode(out["samples"])
        for k, image in enumerate(images):
            path = next_free_path(args.out, args.prefix)
            meta = {"prompt": args.prompt, "negative": args.negative, "seed": seed, "batch_index": k,
                    "steps": args.steps, "cfg": args.cfg,
                    "sampler": "calibrated" if args.calibrate is not None else args.sampler,
                    "scheduler": "calibrated" if args.calibrate is not None else args.scheduler,
                    "denoise": denoise, "model": kind, "init_image": args.init_image}
            meta.update({k: v for k, v in (("variation_seed", args.variation_seed),
                                           ("variation_strength", args.variation_strength),
                                           ("cfg_interval", args.cfg_interval), ("cfg_ramp_end", args.cfg_ramp_end),
                                           ("cfg_stop_at", args.cfg_stop_at),
                                           ("sampler_options", controls.get("sampler_options")))
                         if v is not None and not (k == "cfg_stop_at" and v == 1.0)
                         and not (k == "variation_strength" and v == 0.0)})
            save_png(image, path, {"parameters": json.dumps(meta)}, args.scale)
            written.append((path, seed, k))
            print(f"{path}  seed={seed}  batch_index={k}", flush=True)
        seed = next_seed(seed, args.control_after_generate, rng)
    return written


def run(args) -> dict:
    """Run ``run``: execute a workflow file ``--runs`` times, applying the seed control between runs."""
    from .bundled.images import check_output_folder
    from .workflow import Executor, apply_seed_control, load_workflow, seed_inputs
    graph = load_workflow(args.workflow)
    executor = Executor()
    executor.validate(graph)   # before anything reads the graph (seed_inputs)
    check_output_folder("--out", os.path.abspath(args.out))
    context = {"KSAMPLER_BASE_DIR": os.path.dirname(os.path.abspath(args.workflow)),
               "KSAMPLER_OUTPUT_DIR": os.path.abspath(args.out)}
    rng = random.Random(json.dumps(seed_inputs(graph)))
    results = {}
    for run_index in range(args.runs):
        seeds = ", ".join(f"node {n} {name}={value}" for n, name, value in seed_inputs(graph))
        print(f"run {run_index + 1}/{args.runs}" + (f": {seeds}" if seeds else ""), flush=True)
        results = executor.run(graph, context=context)
        for node_id, ui in executor.ui.items():
            for image in ui.get("images", ()):
                path = os.path.join(context["KSAMPLER_OUTPUT_DIR"], image.get("subfolder", ""), image["filename"])
                print(f"{path}  (node {node_id})", flush=True)
        graph = apply_seed_control(graph, args.control_after_generate, rng)
    return results


# "name: ..." or "--flag: ...": the project's input errors name the input first; Python's own TypeErrors do not
_NAMES_AN_INPUT = re.compile(r"^-{0,2}[\w\[\]'.]+: ")


def _is_input_error(error: BaseException) -> bool:
    """An error to report in one line: bad input or a file or model the user gave (a bug of ours keeps its
    traceback)."""
    from .bundled import BundledModelError
    from .guard import ModelOutputError
    if isinstance(error, (ValueError, OSError, BundledModelError, ModelOutputError)):
        return True   # KSamplerInputError, WorkflowError, unreadable files, a model giving NaN ...
    return isinstance(error, TypeError) and bool(_NAMES_AN_INPUT.match(str(error)))


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            generate(args)
        else:
            run(args)
    except Exception as e:
        if not _is_input_error(e):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
