"""The command line: txt2img / img2img with the bundled model, seed control across runs, workflow files, errors."""
import os
import re

import pytest
import torch

from ksampler.__main__ import main

TOP = (1 << 64) - 1


pytestmark = pytest.mark.usefixtures("one_thread")


def _generate(tmp_path, capsys, *extra):
    code = main(["generate", "--prompt", "a large red circle", "--steps", "2", "--batch-size", "2",
                 "--out", str(tmp_path), "--no-progress", *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


def _seeds(stdout):
    return [int(s) for s in re.findall(r"seed=(\d+)  batch_index=0", stdout)]


def test_generate_writes_pngs_and_prints_the_seed_of_each(tmp_path, capsys):
    code, out, _ = _generate(tmp_path, capsys, "--seed", "7")
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 2 and all("seed=7" in line for line in lines)
    files = sorted(os.listdir(tmp_path))
    assert files == ["ksampler_00001_.png", "ksampler_00002_.png"]
    from ksampler.bundled.images import load_image
    image, _ = load_image(str(tmp_path / files[0]))
    assert image.shape == (1, 32, 32, 3)


@pytest.mark.parametrize("control, start, expected", [
    ("fixed", 5, [5, 5, 5]),
    ("increment", TOP - 1, [TOP - 1, TOP, 0]),
    ("decrement", 1, [1, 0, TOP]),
])
def test_seed_control_across_runs(tmp_path, capsys, control, start, expected):
    code, out, _ = _generate(tmp_path, capsys, "--seed", str(start), "--runs", "3", "--control-after-generate",
                             control, "--batch-size", "1")
    assert code == 0
    assert _seeds(out) == expected
    assert len(os.listdir(tmp_path)) == 3


def test_randomize_is_reproducible_from_the_starting_seed(tmp_path, capsys):
    _, out1, _ = _generate(tmp_path / "a", capsys, "--seed", "3", "--runs", "3", "--control-after-generate",
                           "randomize", "--batch-size", "1")
    _, out2, _ = _generate(tmp_path / "b", capsys, "--seed", "3", "--runs", "3", "--control-after-generate",
                           "randomize", "--batch-size", "1")
    seeds = _seeds(out1)
    assert seeds == _seeds(out2) and seeds[0] == 3 and len(set(seeds)) == 3
    assert all(0 <= s <= TOP for s in seeds)
    from ksampler.bundled.images import load_image
    a = load_image(str(tmp_path / "a" / "ksampler_00002_.png"))[0]
    b = load_image(str(tmp_path / "b" / "ksampler_00002_.png"))[0]
    assert torch.equal(a, b)


def test_same_seed_same_image_and_fixed_runs_repeat(tmp_path, capsys):
    _generate(tmp_path, capsys, "--seed", "11", "--runs", "2", "--batch-size", "1")
    from ksampler.bundled.images import load_image
    a, b = (load_image(str(tmp_path / f))[0] for f in ("ksampler_00001_.png", "ksampler_00002_.png"))
    assert torch.equal(a, b)


def test_img2img_low_denoise_stays_close_to_the_input(tmp_path, capsys):
    from ksampler.bundled.dataset import make_batch
    from ksampler.bundled.images import load_image, save_png
    images, captions, _ = make_batch(1, seed=5, full_captions=True)
    src = images[0].permute(1, 2, 0)
    save_png(src, str(tmp_path / "in.png"))
    code, out, _ = _generate(tmp_path / "o", capsys, "--init-image", str(tmp_path / "in.png"), "--denoise", "0.3",
                             "--steps", "4", "--batch-size", "1", "--prompt", captions[0])
    assert code == 0
    result = load_image(str(tmp_path / "o" / "ksampler_00001_.png"))[0][0]
    assert float((result - src).abs().mean()) < 0.06


@pytest.mark.parametrize("args, message", [
    (["--sampler", "nope"], "sampler_name: unknown sampler 'nope'"),
    (["--width", "30"], "--width: must be a multiple of 16"),
    (["--denoise", "0.5"], "--denoise: below 1 needs --init-image"),
    (["--init-image", "/nonexistent.png"], "does not exist"),
    (["--cfg", "-1"], "cfg: must be between 0"),
])
def test_bad_arguments_give_a_clear_error(tmp_path, capsys, args, message):
    code, _, err = _generate(tmp_path, capsys, *args)
    assert code == 2 and message in err


def test_seed_out_of_range_is_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "x", "--seed", str(TOP + 1), "--out", str(tmp_path)])
    assert "must be between 0 and" in capsys.readouterr().err


def test_unknown_words_are_reported_not_fatal(tmp_path, capsys):
    code, _, err = _generate(tmp_path, capsys, "--prompt", "a red zebra")
    assert code == 0 and "zebra" in err


@pytest.mark.parametrize("name", ["text_to_image.json", "image_to_image.json"])
def test_shipped_workflows_run(tmp_path, capsys, name):
    import ksampler
    path = os.path.join(os.path.dirname(ksampler.__file__), "workflows", name)
    code = main(["run", path, "--out", str(tmp_path), "--runs", "2", "--control-after-generate", "increment"])
    out = capsys.readouterr().out
    assert code == 0
    assert "run 1/2: node" in out and "seed=1" in out and "seed=2" in out
    pngs = [f for f in os.listdir(tmp_path) if f.endswith(".png")]
    assert len(pngs) == (8 if name == "text_to_image.json" else 2)
    printed = re.findall(r"^(\S+\.png)  \(node \d+\)$", out, re.M)   # each saved file's path, once
    assert sorted(printed) == sorted(str(tmp_path / f) for f in pngs)


def test_run_reports_workflow_errors(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"1": {"class_type": "CheckpointLoaderSimple", "inputs": {}}}')
    assert main(["run", str(bad)]) == 2
    assert "unknown node type 'CheckpointLoaderSimple'" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--sampler-option", "eta=0.5"], "sampler 'dpmpp_2m' does not take 'eta'"),
    (["--sampler-option", "eta"], "not name=value"),
    (["--variation-strength", "0.5"], "--variation-strength: needs --variation-seed"),
    (["--variation-seed", "3", "--variation-strength", "2"], "--variation-strength: must be between 0 and 1"),
    (["--cfg-interval", "2", "1"], "--cfg-interval: 2 is above"),
    (["--cfg-stop-at", "1.5"], "--cfg-stop-at: must be"),
])
def test_control_flags_give_a_clear_error(tmp_path, capsys, args, message):
    code, _, err = _generate(tmp_path, capsys, *args)
    assert code == 2 and message in err, err


def test_control_flags_change_the_image_and_the_contact_sheet_is_written(tmp_path, capsys):
    from ksampler.bundled.images import load_image
    _, out, _ = _generate(tmp_path / "a", capsys, "--seed", "3")
    plain = load_image(str(tmp_path / "a" / "ksampler_00001_.png"))[0]
    sheet = tmp_path / "sheet.png"
    code, out, _ = _generate(tmp_path / "b", capsys, "--seed", "3", "--variation-seed", "9", "--variation-strength",
                             "0.5", "--cfg-interval", "0.1", "0.9", "--sampler", "euler_ancestral",
                             "--sampler-option", "eta=0.5", "--preview-steps", str(sheet))
    assert code == 0 and "denoised estimate per step (2 steps)" in out
    varied = load_image(str(tmp_path / "b" / "ksampler_00001_.png"))[0]
    assert not torch.equal(plain, varied)
    grid = load_image(str(sheet))[0]
    assert grid.shape[1:3] == (2 * 33 + 1, 2 * 33 + 1)      # 2 images x 2 steps of 32 px with 1 px gaps
    # defaults: the same image as without the flags
    _generate(tmp_path / "c", capsys, "--seed", "3", "--variation-seed", "9", "--variation-strength", "0",
              "--cfg-stop-at", "1")
    assert torch.equal(plain, load_image(str(tmp_path / "c" / "ksampler_00001_.png"))[0])


def test_calibrate_fits_once_saves_and_reloads_in_another_run(tmp_path, capsys):
    path = tmp_path / "cal.safetensors"
    flags = ("--seed", "3", "--batch-size", "1", "--steps", "3", "--calibrate", str(path), "--calibrate-iterations", "2")
    code, out, err = _generate(tmp_path / "a", capsys, *flags)
    assert code == 0 and "fitting once" in err and f"saved {path}" in err and path.exists()
    from ksampler.bundled.images import load_image
    from ksampler.calibration import clear_cache
    first = load_image(str(tmp_path / "a" / "ksampler_00001_.png"))[0]
    clear_cache()  # as a new process: only the file is left
    code, out, err = _generate(tmp_path / "b", capsys, *flags)
    assert code == 0 and f"loaded {path}" in err and "fitting" not in err
    assert torch.equal(first, load_image(str(tmp_path / "b" / "ksampler_00001_.png"))[0])
    code, out, err = _generate(tmp_path / "c", capsys, "--seed", "3", "--batch-size", "1", "--steps", "3")
    assert not torch.equal(first, load_image(str(tmp_path / "c" / "ksampler_00001_.png"))[0])
    # the same file for another prompt is refused, never refitted over
    code, _, err = main(["generate", "--prompt", "a small blue square", "--out", str(tmp_path / "d"),
                         "--no-progress", *flags]), *capsys.readouterr()
    assert code == 2 and "--calibrate:" in err and "other inputs" in err
    # with progress shown, the fit has a bar over its iterations
    code, _, err = main(["generate", "--prompt", "a small blue square", "--out", str(tmp_path / "e"), "--seed", "3",
                         "--batch-size", "1", "--steps", "3", "--calibrate", "--calibrate-iterations", "2"]), \
        *capsys.readouterr()
    assert code == 0 and "calibration fit" in err and "fitting once" in err


@pytest.mark.parametrize("args, message", [
    (["--calibrate", "--denoise", "0.5", "--init-image", "x.png"], "--calibrate: calibrations are for text-to-image"),
    (["--calibrate", "--sampler-option", "eta=0.5"], "--calibrate: the fit is for this constant cfg"),
    (["--calibrate", "--cfg-stop-at", "0.5"], "--calibrate: the fit is for this constant cfg"),
    (["--calibrate", "cal.json"], "must end in .safetensors"),
    (["--calibrate", "/nonexistent/c.safetensors"], "does not exist; create it first"),
    (["--calibrate", "--calibrate-iterations", "-1"], "--calibrate-iterations: must be between 0 and 5000"),
])
def test_calibrate_flags_give_a_clear_error(tmp_path, capsys, args, message):
    code, _, err = _generate(tmp_path, capsys, *args)
    assert code == 2 and message in err, err
