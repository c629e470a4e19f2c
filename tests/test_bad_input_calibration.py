"""Bad input to the calibration code: each gets a clear error naming the input and the fix, before any fit; a
damaged or edited calibration file is refused naming the file; a calibration never samples another model's
model sampling."""
from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from analytic import analytic_model, conditioning
from ksampler.calibration import (Calibration, calibrate, clear_cache, fit_calibration, run_sigmas,
                                  sample_calibrated)
from ksampler.calibration_nodes import CalibratedScheduler
from ksampler.models import EPS, Flow
from ksampler.nodes import KSampler
from ksampler.validation import KSamplerInputError

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"fit_noises": 4, "iterations": 2, "teacher_steps": 10}
POS, NEG = conditioning(1.0), conditioning(-1.0)

# what pickle.dumps({"sigmas": [1, 0]}) writes (protocol 4), written out: the project never imports pickle
PICKLED = b"\x80\x04\x95\x15\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x06sigmas\x94]\x94(K\x01K\x00es."


def _latent():
    return {"samples": torch.zeros(1, 4, 8, 8)}


def _quiet(message):
    pass


@pytest.fixture(scope="module")
def fitted():
    """A small 3-step fit at cfg 3 on the eps analytic model, with corrector and shifts as it chose."""
    clear_cache()
    return calibrate(analytic_model(), POS, NEG, _latent(), 3, 3.0, log=_quiet, **SMALL)


def _write(path, tensors: dict, info, fmt: str = "ksampler.calibration/3") -> str:
    metadata = {"format": fmt, "info": info if isinstance(info, str) else json.dumps(info)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return str(path)


def _tensors(cal: Calibration) -> dict:
    out = {"sigmas": cal.sigmas, "coefficients": cal.coefficients}
    out.update({k: getattr(cal, k) for k in ("corrector", "shift") if getattr(cal, k) is not None})
    return out


# ---- calibrate's and fit_calibration's arguments: checked before any fit ----------------------------------------
@pytest.mark.parametrize("name, bad", [
    ("steps", 0), ("steps", 101), ("steps", 10 ** 6), ("steps", 2.5), ("steps", True), ("steps", "3"),
    ("cfg", -5.0), ("cfg", 1e300), ("cfg", math.nan), ("cfg", math.inf), ("cfg", "3"),
    ("iterations", -1), ("iterations", 2.5), ("iterations", 5001),
    ("teacher_steps", 0), ("teacher_steps", 1), ("teacher_steps", 9), ("teacher_steps", "10"),
    ("teacher_steps", 1001),
    ("seed", -1), ("seed", 2 ** 70), ("seed", 1.5), ("seed", "1"),
    ("fit_noises", 3), ("fit_noises", 257), ("fit_noises", 4.0),
    ("refine_noises", 2), ("refine_noises", 4097), ("refine_noises", 8.0),
    ("order", 0), ("order", 5), ("fit_candidates", 5),
])
def test_calibrate_refuses_a_bad_argument_naming_it_before_fitting(name, bad):
    clear_cache()
    model = analytic_model()
    args = {"steps": 3, "cfg": 3.0, **SMALL}
    args[name] = bad
    steps, cfg = args.pop("steps"), args.pop("cfg")
    with pytest.raises(ValueError, match=rf"^{name}: "):
        calibrate(model, POS, NEG, _latent(), steps, cfg, log=_quiet, **args)
    assert not model.network.calls  # refused before the fit


@pytest.mark.parametrize("name", ["log", "progress"])
def test_calibrate_refuses_a_log_or_progress_that_is_not_a_function(name):
    with pytest.raises(TypeError, match=rf"^{name}: expected a function"):
        calibrate(analytic_model(), POS, NEG, _latent(), 3, 3.0, **{name: 5}, **SMALL)


def test_calibrate_with_log_none_is_silent(capsys):
    clear_cache()
    cal = calibrate(analytic_model(), POS, NEG, _latent(), 2, 3.0, log=None, **SMALL)
    assert cal.steps == 2 and capsys.readouterr().out == ""


@pytest.mark.parametrize("name, bad", [
    ("steps", 101), ("steps", 0), ("iterations", -1), ("iterations", 2.5), ("teacher_steps", 0),
    ("teacher_steps", 1), ("teacher_steps", "10"), ("lr", math.nan), ("lr", -1.0), ("lr", "0.1"),
    ("sigma_min", "x"), ("sigma_max", math.inf), ("teacher_sigma_min", math.nan), ("log", 5), ("progress", "x"),
    ("solve_start", 1), ("info", []), ("info", {"cfg": "x"}), ("info", {"key": 5}),
])
def test_fit_calibration_refuses_a_bad_argument_naming_it(name, bad):
    ms = EPS()
    calls = []

    def denoiser(x, sigma):
        calls.append(1)
        return x * 0

    kwargs = {"iterations": 2, "teacher_steps": 10, name: bad}
    steps = kwargs.pop("steps", 3)
    with pytest.raises((ValueError, TypeError), match=rf"^{name}: "):
        fit_calibration(denoiser, ms, torch.randn(4, 2, dtype=torch.float64), steps, **kwargs)
    assert not calls


# ---- the file path: checked up front, in every entry point -------------------------------------------------------
def _bad_paths(tmp_path) -> dict:
    (tmp_path / "folder.safetensors").mkdir()
    return {"no folder": str(tmp_path / "nodir" / "x.safetensors"), "not .safetensors": str(tmp_path / "x.bin"),
            "NUL": str(tmp_path / "a\x00b.safetensors"), "a folder": str(tmp_path / "folder.safetensors"),
            "not a str": 5}


@pytest.mark.parametrize("case", ["no folder", "not .safetensors", "NUL", "a folder", "not a str"])
def test_calibrate_checks_its_path_before_fitting(tmp_path, case):
    clear_cache()
    model, path = analytic_model(), _bad_paths(tmp_path)[case]
    with pytest.raises(ValueError, match="^path: "):
        calibrate(model, POS, NEG, _latent(), 3, 3.0, path=path, log=_quiet, **SMALL)
    assert not model.network.calls and not (tmp_path / "x.bin").exists()


@pytest.mark.parametrize("case", ["no folder", "not .safetensors", "NUL", "a folder"])
def test_the_node_checks_calibration_file_before_fitting(tmp_path, case):
    clear_cache()
    model = analytic_model()
    with pytest.raises(KSamplerInputError, match="^calibration_file: "):
        CalibratedScheduler().calibrate(model, POS, NEG, _latent(), 3, 3.0, calibration_file=_bad_paths(tmp_path)[case],
                                        **SMALL)
    assert not model.network.calls


def test_a_folder_where_no_file_can_be_written_is_refused_before_fitting(tmp_path, monkeypatch):
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)
    model = analytic_model()
    with pytest.raises(ValueError, match="path: cannot write a new file in .*Permission denied"):
        calibrate(model, POS, NEG, _latent(), 3, 3.0, path=str(tmp_path / "c.safetensors"), log=_quiet, **SMALL)
    assert not model.network.calls


def test_a_save_that_fails_when_written_names_the_file(tmp_path, monkeypatch, fitted):
    import safetensors.torch

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    path = str(tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match=r"^path: could not write .*c\.safetensors.*No space left"):
        fitted.save(path)
    clear_cache()
    with pytest.raises(ValueError, match=r"^calibration_file: could not write .*c\.safetensors"):
        calibrate(analytic_model(), POS, NEG, _latent(), 3, 3.0, path=path, log=_quiet, **SMALL)


# ---- damaged files: a clear error naming the file, from load, calibrate, the node and the command line -----------
def _damaged(tmp_path, fitted) -> dict:
    good = tmp_path / "good.safetensors"
    fitted.save(str(good))
    data = good.read_bytes()
    files = {"pickle": PICKLED, "empty": b"", "truncated": data[:50],
             "truncated tail": data[:-8]}
    paths = {}
    for name, content in files.items():
        paths[name] = tmp_path / f"{name.replace(' ', '_')}.safetensors"
        paths[name].write_bytes(content)
    info = fitted.info
    paths["no sigmas"] = _write(tmp_path / "nosig.safetensors", {"coefficients": fitted.coefficients}, info)
    paths["no coefficients"] = _write(tmp_path / "nocoef.safetensors", {"sigmas": fitted.sigmas}, info)
    paths["no format"] = tmp_path / "nofmt.safetensors"
    save_file(_tensors(fitted), str(paths["no format"]))
    return {k: str(v) for k, v in paths.items()}


DAMAGED = ["pickle", "empty", "truncated", "truncated tail", "no sigmas", "no coefficients", "no format"]


@pytest.mark.parametrize("case", DAMAGED)
def test_loading_a_damaged_file_names_it(tmp_path, fitted, case):
    path = _damaged(tmp_path, fitted)[case]
    with pytest.raises(ValueError, match=f"^path: '{path}'"):
        Calibration.load(path)


@pytest.mark.parametrize("bad, message", [(None, "path: expected"), (5, "path: expected")])
def test_load_refuses_what_is_not_a_path(bad, message):
    with pytest.raises(ValueError, match=message):
        Calibration.load(bad)


def test_load_refuses_a_missing_file_and_a_folder(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Calibration.load(str(tmp_path / "none.safetensors"))
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        Calibration.load(str(tmp_path / "d.safetensors"))


@pytest.mark.parametrize("case", ["pickle", "empty", "truncated", "no sigmas"])
def test_calibrate_and_the_node_name_a_damaged_calibration_file(tmp_path, fitted, case):
    path = _damaged(tmp_path, fitted)[case]
    clear_cache()
    with pytest.raises(ValueError, match=f"^calibration_file: '{path}'.*delete it"):
        calibrate(analytic_model(), POS, NEG, _latent(), 3, 3.0, path=path, log=_quiet, **SMALL)
    clear_cache()
    with pytest.raises(KSamplerInputError, match=f"^calibration_file: '{path}'.*delete it"):
        CalibratedScheduler().calibrate(analytic_model(), POS, NEG, _latent(), 3, 3.0, calibration_file=path, **SMALL)


def test_the_command_line_names_a_damaged_calibration_file(tmp_path, capsys):
    from ksampler.__main__ import main
    path = tmp_path / "cal.safetensors"
    path.write_bytes(PICKLED)
    code = main(["generate", "--prompt", "red", "--steps", "1", "--batch-size", "1", "--out", str(tmp_path),
                 "--no-progress", "--calibrate", str(path), "--calibrate-iterations", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and f"--calibrate: '{path}' is not a readable" in err


# ---- files with edited contents: what load reads is checked -------------------------------------------------------
def _edits(fitted) -> dict:
    """name -> (tensors, info) of a file edited from the fit."""
    t, info = _tensors(fitted), dict(fitted.info)
    steps = fitted.steps
    return {
        "info []": (t, "[]"), "info null": (t, "null"), "info not JSON": (t, "{bad"),
        "info cfg 'x'": (t, {**info, "cfg": "x"}), "info key 5": (t, {**info, "key": 5}),
        "info steps 'x'": (t, {**info, "steps": "x"}), "info order 2.5": (t, {**info, "order": 2.5}),
        "info model_sampling []": (t, {**info, "model_sampling": []}),
        "info model_sampling sigma 'x'": (t, {**info, "model_sampling": {**info["model_sampling"],
                                                                          "sigma_max": "x"}}),
        "sigmas nan": ({**t, "sigmas": torch.tensor([math.nan, 1.0, 0.5, 0.0])}, info),
        "sigmas inf": ({**t, "sigmas": torch.tensor([math.inf, 1.0, 0.5, 0.0])}, info),
        "sigmas 1e30": ({**t, "sigmas": torch.tensor([1e30, 1.0, 0.5, 0.0])}, info),
        "sigmas not ending in 0": ({**t, "sigmas": torch.tensor([14.6, 1.0, 0.5, 0.1])}, info),
        "sigmas rising": ({**t, "sigmas": torch.tensor([14.6, 1.0, 2.0, 0.0])}, info),
        "sigmas int": ({**t, "sigmas": torch.tensor([14, 3, 1, 0])}, info),
        "coefficients 0 columns": ({**t, "coefficients": torch.zeros(steps, 0)}, info),
        "coefficients 9 columns": ({**t, "coefficients": torch.zeros(steps, 9)}, info),
        "coefficients bool": ({**t, "coefficients": torch.ones(steps, 3, dtype=torch.bool)}, info),
        "coefficients huge": ({**t, "coefficients": torch.full((steps, 3), 1e38)}, info),
        "coefficients nan": ({**t, "coefficients": torch.full((steps, 3), math.nan)}, info),
        "coefficients of another order": ({**t, "coefficients": torch.tensor([[1.0, 0.0]] * steps)},
                                          {k: v for k, v in info.items()}),
        "shift huge": ({**t, "shift": torch.full((steps,), 1e3)}, info),
        "shift nan": ({**t, "shift": torch.full((steps,), math.nan)}, info),
        "corrector nan": ({**t, "corrector": torch.full((steps, 4), math.nan)}, info),
        "2-step tensors, 3-step info": ({"sigmas": torch.tensor([14.6146, 1.0, 0.0]),
                                        "coefficients": t["coefficients"][:2]}, info),
    }


@pytest.mark.parametrize("case", [
    "info []", "info null", "info not JSON", "info cfg 'x'", "info key 5", "info steps 'x'", "info order 2.5",
    "info model_sampling []", "info model_sampling sigma 'x'", "sigmas nan", "sigmas inf", "sigmas 1e30",
    "sigmas not ending in 0", "sigmas rising", "sigmas int", "coefficients 0 columns", "coefficients 9 columns",
    "coefficients bool", "coefficients huge", "coefficients nan", "coefficients of another order", "shift huge",
    "shift nan", "corrector nan", "2-step tensors, 3-step info"])
def test_an_edited_file_is_refused_naming_it(tmp_path, fitted, case):
    tensors, info = _edits(fitted)[case]
    path = _write(tmp_path / "edited.safetensors", tensors, info)
    with pytest.raises(ValueError, match=f"^path: '{path}'.*delete it"):
        Calibration.load(path)


def test_a_file_edited_under_its_key_is_refused_not_sampled_at_another_step_count(tmp_path):
    clear_cache()
    path = str(tmp_path / "c.safetensors")
    cal = calibrate(analytic_model(), POS, NEG, _latent(), 3, 3.0, path=path, log=_quiet, **SMALL)
    with safe_open(path, framework="pt") as f:
        info = json.loads(f.metadata()["info"])
    # 2-step tensors under the 3-step fit's key (and its info, steps edited too): loads as a calibration, but
    # not for this call
    two = {"sigmas": torch.tensor([float(cal.sigmas[0]), 1.0, 0.0]),
           "coefficients": torch.tensor([[1.0, 0.0, 0.0]] * 2, dtype=torch.float64)}
    _write(path, two, {**info, "steps": 2})
    assert Calibration.load(path).steps == 2
    for call in (lambda: calibrate(analytic_model(), POS, NEG, _latent(), 3, 3.0, path=path, log=_quiet, **SMALL),
                 lambda: CalibratedScheduler().calibrate(analytic_model(), POS, NEG, _latent(), 3, 3.0,
                                                         calibration_file=path, **SMALL)):
        clear_cache()
        with pytest.raises(ValueError, match=r"^calibration_file: .*3 steps.*holds a calibration for 2 steps"):
            call()
    # the same with the fitted cfg edited, the key kept
    _write(path, _tensors(cal), {**info, "cfg": 5.0})
    clear_cache()
    with pytest.raises(ValueError, match=r"^calibration_file: .*holds a calibration for cfg 5"):
        calibrate(analytic_model(), POS, NEG, _latent(), 3, 3.0, path=path, log=_quiet, **SMALL)


# ---- calibrations built in Python: checked where they are used ---------------------------------------------------
@pytest.mark.parametrize("change", [
    {"sigmas": torch.tensor([math.nan, 1.0, 0.5, 0.0])}, {"sigmas": torch.tensor([14.6, 1.0, 0.5, 0.2])},
    {"coefficients": torch.full((3, 3), math.nan)}, {"coefficients": torch.zeros(3, 0)}, {"info": None},
    {"info": {"cfg": "x"}}, {"info": []}, {"eta": math.nan},
], ids=["sigmas nan", "sigmas not ending in 0", "coefficients nan", "coefficients 0 columns", "info None",
        "info cfg str", "info list", "eta nan"])
def test_the_ksampler_refuses_a_broken_calibration_naming_it(fitted, change):
    broken = dataclasses.replace(fitted, **change)
    with pytest.raises(KSamplerInputError, match="^(calibration|eta): "):
        KSampler().sample(analytic_model(), 1, 3, 3.0, "euler", "karras", POS, NEG, _latent(), calibration=broken)
    with pytest.raises(ValueError, match="^(calibration|eta): "):
        run_sigmas(broken, 3, 3.0)


# ---- the model sampling a calibration was fitted on --------------------------------------------------------------
def test_a_calibration_refuses_a_model_with_other_model_sampling(fitted):
    assert fitted.info["model_sampling"]["type"] == "EPS" and not fitted.info["model_sampling"]["flow"]
    flow = analytic_model(flow=True)
    with pytest.raises(KSamplerInputError, match="^calibration: fitted for a model with EPS.*Flow.*refit"):
        KSampler().sample(flow, 1, 3, 3.0, "euler", "karras", POS, NEG, _latent(), calibration=fitted)
    with pytest.raises(KSamplerInputError, match="^calibration: .*refit"):
        run_sigmas(fitted, 3, 3.0, model_sampling=flow.model_sampling)
    with pytest.raises(KSamplerInputError, match="^calibration: .*refit"):  # the SAMPLER (SamplerCustom's path)
        fitted.sampler()(flow, torch.zeros(1, 4, 8, 8), fitted.sigmas)
    with pytest.raises(KSamplerInputError, match="^calibration: .*sigma"):  # same class, another sigma range
        run_sigmas(fitted, 3, 3.0, model_sampling=EPS(linear_end=0.02))
    # the same kind of model sampling passes
    assert torch.equal(run_sigmas(fitted, 3, 3.0, model_sampling=EPS()), fitted.sigmas)


def test_the_model_sampling_record_survives_a_file_and_older_files_without_it_still_sample(tmp_path, fitted):
    path = str(tmp_path / "c.safetensors")
    fitted.save(path)
    assert Calibration.load(path).info["model_sampling"] == fitted.info["model_sampling"]
    # a file from before the record: loads and samples the model it was fitted for as before
    older = {k: v for k, v in fitted.info.items() if k != "model_sampling"}
    _write(path, _tensors(fitted), older)
    loaded = Calibration.load(path)
    assert "model_sampling" not in loaded.info
    model = analytic_model()
    ours = KSampler().sample(model, 1, 3, 3.0, "euler", "karras", POS, NEG, _latent(), calibration=loaded)[0]
    recorded = KSampler().sample(model, 1, 3, 3.0, "euler", "karras", POS, NEG, _latent(), calibration=fitted)[0]
    assert torch.equal(ours["samples"], recorded["samples"])


def test_a_bare_denoiser_without_model_sampling_is_not_checked(fitted):
    x = torch.randn(1, 4, 8, 8) * 14.6
    out = sample_calibrated(lambda x, sigma: x * 0, x, fitted.sigmas, coefficients=fitted.coefficients)
    assert torch.equal(out, torch.zeros_like(x))
    assert torch.equal(fitted.sampler()(lambda x, sigma: x * 0, x, fitted.sigmas), torch.zeros_like(x))


def test_fitting_on_a_flow_model_records_it(tmp_path):
    clear_cache()
    cal = calibrate(analytic_model(flow=True), POS, NEG, _latent(), 2, 3.0, log=_quiet, **SMALL)
    record = cal.info["model_sampling"]
    assert record["flow"] and record["prediction"] == "flow" and record["sigma_max"] == pytest.approx(1.0)
    with pytest.raises(KSamplerInputError, match="^calibration: .*Flow.*EPS"):
        KSampler().sample(analytic_model(), 1, 2, 3.0, "euler", "karras", POS, NEG, _latent(), calibration=cal)
    assert Flow(shift=3.0).is_flow


# ---- the graph, checked before a fit as our KSampler checks it; the sampler runs only its own sigmas -------------
@pytest.mark.parametrize("positive, name", [
    (conditioning(float("nan")), "positive[0]"),                                  # a broken encoder
    (conditioning(1.0, area=(8, 8, 100, 100)), "positive[0]['area']"),            # an area outside the latent
    ([], "positive"),
])
def test_calibrate_checks_the_graph_before_fitting(positive, name):
    said = []
    with pytest.raises(KSamplerInputError, match=rf"^{re.escape(name)}"):
        calibrate(analytic_model(), positive, NEG, _latent(), 3, 3.0, log=said.append, **SMALL)
    assert not any("fitting" in message for message in said), said


def test_calibrate_says_masks_must_repeat_over_the_fitting_batch():
    positive = conditioning(1.0, mask=torch.ones(3, 8, 8))   # three masks: a latent batch of 1 takes the first
    with pytest.raises(KSamplerInputError, match=r"positive\[0\]\['mask'\].*fits 4 noises"):
        calibrate(analytic_model(), positive, NEG, _latent(), 3, 3.0, log=_quiet, **SMALL)


def test_a_calibrated_sampler_runs_its_own_sigmas_or_their_tail(fitted):
    x = torch.randn(1, 4, 8, 8)
    sampler = fitted.sampler()

    def guided(x, sigma, **kwargs):  # the data's mean: a finite denoiser (the sigmas are checked before any call)
        return x * 0
    for other in (fitted.sigmas * 2, fitted.sigmas.flip(0), fitted.sigmas[:-1], fitted.sigmas[:1],
                  torch.tensor([1.0, 0.5, 0.2, 0.0]), torch.tensor([float("nan"), 1.0, 0.0, 0.0])):
        with pytest.raises(KSamplerInputError, match="^sigmas: a calibrated sampler runs the sigmas"):
            sampler(guided, x * other[0], other)
    tail = fitted.sigmas[1:]  # a split's low part runs the last rows
    assert torch.isfinite(sampler(guided, x * tail[0], tail)).all()
