"""Bad input to the CLI, the workflow runner, the bundled-model nodes and KSampler+ (Two Models): one clear error
that names the input (or flag, or node and field) and says the fix; no traceback, no NaN passed on."""
import json
import os

import pytest
import torch

from analytic import analytic_model, conditioning
from ksampler.__main__ import main
from ksampler.bundled import load_bundled
from ksampler.bundled.nodes import SaveImage, TextEncode, VAEDecode, VAEEncode
from ksampler.conditioning import KSamplerInputError
from ksampler.graph_checks import ModelSpec, check_latent_fits
from ksampler.nodes import KSamplerTwoModels
from ksampler.workflow import Executor, WorkflowError, load_workflow

MODEL = analytic_model()
P, N = conditioning(1.0), conditioning(-1.0)
LATENT = {"samples": torch.zeros(1, 4, 8, 8)}


@pytest.fixture(scope="module")
def bundled():
    return load_bundled("flow")


# ---- KSampler+ (Two Models) ---------------------------------------------------------------------------------------

def two_models(**kw):
    args = dict(model_high=MODEL, model_low=MODEL, noise_seed=1, steps=4, cfg_high=3.0, cfg_low=2.0,
                sampler_name="euler", scheduler="karras", positive=P, negative=N, latent_image=LATENT,
                boundary=0.875, switch_by="sigma", switch_at_step=2)
    args.update(kw)
    return KSamplerTwoModels().sample(**args)


@pytest.mark.parametrize("kw, match", [
    (dict(sampler_options=[1]), "^sampler_options: expected the output of a Sampler Options\\+ node, got list"),
    (dict(sampler_options="eta=1"), "^sampler_options: .* got str"),
    (dict(boundary=5.0), r"^boundary: must be between 0.0 and 1.0, got 5.0"),
    (dict(boundary=-1), r"^boundary: must be between 0.0 and 1.0, got -1"),
    (dict(boundary=float("nan")), "^boundary: must be finite"),
    (dict(boundary=5.0, switch_by="step"), "^boundary: must be between 0.0 and 1.0"),
    (dict(positive_low=[[torch.zeros(1, 4, 16), {}]]), "^positive_low: context width 16 differs from negative's 8"),
    (dict(negative_low=[[torch.zeros(1, 4, 16), {}]]), "^negative_low: context width 16 differs from positive's 8"),
    (dict(positive_low=[[torch.zeros(1, 4, 16), {}]], negative_low=[[torch.zeros(1, 4, 8), {}]]),
     "^negative_low: context width 8 differs from positive_low's 16"),
    (dict(positive_low="x"), "^positive_low: expected CONDITIONING"),
    (dict(negative_low=[[torch.full((1, 4, 8), float("nan")), {}]]), r"^negative_low\[0\]"),
    (dict(negative_low=[]), "^negative_low: "),   # at cfg_low 2: refused before the high stage runs
])
def test_two_models_bad_input_names_the_input(kw, match):
    with pytest.raises(KSamplerInputError, match=match):
        two_models(**kw)


def test_two_models_valid_low_conditioning_still_samples():
    out, switch = two_models(positive_low=conditioning(0.5), negative_low=conditioning(-0.5))
    assert torch.isfinite(out["samples"]).all() and 0 < switch < 4


# ---- bundled nodes ------------------------------------------------------------------------------------------------

def test_text_encode_names_its_clip_input(bundled):
    with pytest.raises(KSamplerInputError, match="^clip: expected the CLIP output .* got PixelVAE"):
        TextEncode().encode("red", bundled[2])


@pytest.mark.parametrize("node, call", [
    (VAEEncode, lambda node, clip: node.encode(torch.rand(1, 32, 32, 3), clip)),
    (VAEDecode, lambda node, clip: node.decode({"samples": torch.zeros(1, 3, 32, 32)}, clip)),
])
def test_vae_nodes_name_their_vae_input(bundled, node, call):
    with pytest.raises(KSamplerInputError, match="^vae: expected the VAE output .* got TextEncoderWrapper"):
        call(node(), bundled[1])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_vae_encode_refuses_non_finite_pixels(bundled, value):
    pixels = torch.rand(1, 32, 32, 3)
    pixels[0, 3, 4, 1] = value
    with pytest.raises(KSamplerInputError, match="^pixels: contains NaN or Inf"):
        VAEEncode().encode(pixels, bundled[2])


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_vae_decode_refuses_a_non_finite_latent(bundled, value):
    samples = torch.zeros(1, 3, 32, 32)
    samples[0, 1, 2, 3] = value
    with pytest.raises(KSamplerInputError, match="^samples: contains NaN or Inf"):
        VAEDecode().decode({"samples": samples}, bundled[2])


def test_vae_encode_keeps_pixels_outside_0_1_as_comfyui_does(bundled):
    latent = VAEEncode().encode(torch.full((1, 32, 32, 3), 1.5), bundled[2])[0]["samples"]
    assert torch.allclose(latent, torch.full_like(latent, 2.0))


def test_vae_encode_shape_error_does_not_claim_a_value_range(bundled):
    with pytest.raises(KSamplerInputError, match="^pixels: expected an IMAGE tensor") as info:
        VAEEncode().encode(torch.rand(1, 32, 32, 5), bundled[2])
    assert "0..1" not in str(info.value)


def test_vae_encode_size_error_proposes_the_nearest_valid_size(bundled):
    with pytest.raises(KSamplerInputError, match="^pixels: the image is 40x24; .* resize it to 48x32"):
        VAEEncode().encode(torch.rand(1, 24, 40, 3), bundled[2])


@pytest.mark.parametrize("kw, match", [
    (dict(images=torch.rand(1, 0, 32, 3)), "^images: the images are 32x0 pixels"),
    (dict(images=torch.rand(1, 32, 0, 3)), "^images: the images are 0x32 pixels"),
    (dict(images=torch.full((1, 8, 8, 3), float("nan"))), "^images: contains NaN or Inf"),
    (dict(images=torch.full((1, 8, 8, 3), float("inf"))), "^images: contains NaN or Inf"),
    (dict(images=torch.zeros(1, 8, 8, 3, dtype=torch.uint8)), "^images: expected a float IMAGE"),
    (dict(filename_prefix="a" * 300), "^filename_prefix: the file name part is 300 bytes long; at most 240"),
    (dict(filename_prefix="sub" * 100 + "/x"), "^filename_prefix: the folder name"),
    (dict(filename_prefix="a\0b"), "^filename_prefix: .* NUL"),
    (dict(filename_prefix="sub/"), "^filename_prefix: .* ends with a folder separator"),
])
def test_save_image_bad_input_names_the_input(tmp_path, kw, match):
    args = dict(images=torch.rand(1, 8, 8, 3), filename_prefix="x", output_dir=str(tmp_path))
    args.update(kw)
    with pytest.raises(KSamplerInputError, match=match):
        SaveImage().save_images(**args)
    assert os.listdir(tmp_path) == []


def test_save_image_output_dir_that_is_a_file(tmp_path):
    existing = tmp_path / "file.txt"
    existing.write_text("x")
    with pytest.raises(KSamplerInputError, match="^output_dir: .* is an existing file, not a folder"):
        SaveImage().save_images(torch.rand(1, 8, 8, 3), "x", output_dir=str(existing))
    with pytest.raises(KSamplerInputError, match="^filename_prefix: .* is an existing file, not a folder"):
        SaveImage().save_images(torch.rand(1, 8, 8, 3), "file.txt/x", output_dir=str(tmp_path))
    with pytest.raises(KSamplerInputError, match="^filename_prefix: cannot create the folder"):
        SaveImage().save_images(torch.rand(1, 8, 8, 3), "file.txt/sub/x", output_dir=str(tmp_path))


# ---- graph checks: the size fix is a valid size -------------------------------------------------------------------

@pytest.mark.parametrize("height, width, fix", [(24, 40, "width 48 and height 32"), (8, 8, "width 16 and height 16"),
                                                (33, 500, "width 496 and height 32")])
def test_bundled_latent_size_error_proposes_a_valid_size(height, width, fix):
    spec = ModelSpec("the bundled flow model", 3, context_dim=8, size_multiple=16, downscale=1,
                     widen_empty_latent=False, empty_latent_node="Empty Latent Image (ksampler)",
                     vae_hint="VAE Encode (ksampler)")
    latent = {"samples": torch.zeros(1, 3, height, width), "ksampler_bundled": True}
    with pytest.raises(KSamplerInputError, match=r"^latent_image\['samples'\]") as info:
        check_latent_fits(spec, latent["samples"], latent)
    message = str(info.value)
    assert fix in message and f"width {width} and height {height}" not in message
    assert message.count("x".join(fix.replace("width ", "").split(" and height "))) == 1, message


def test_unknown_latent_kind_size_error_gives_the_nearest_sides():
    spec = ModelSpec("the model 'x'", 3, size_multiple=2, downscale=8)
    with pytest.raises(KSamplerInputError, match=r"multiples of 16 pixels: .* at 48x32 \(the nearest valid size\)"):
        check_latent_fits(spec, torch.zeros(1, 3, 3, 5))


# ---- workflow files -----------------------------------------------------------------------------------------------

GOOD_NODE = {"class_type": "ksampler_EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}}


@pytest.mark.parametrize("text, match", [
    ("[1, 2]", "^workflow: .* holds an array; expected an object"),
    ('"abc"', "^workflow: .* holds a string"),
    ("5", "^workflow: .* holds a number"),
    ("null", "^workflow: .* holds null"),
    ('{"1": "x"}', "^node 1: expected an object .* got a string"),
    ('{"1": {"class_type": "ksampler_KSampler", "inputs": []}}', "^node 1: 'inputs' must be an object .* an array"),
    ('{"1": {"class_type": ["x"], "inputs": {}}}', "^node 1: 'class_type' must be a string .* an array"),
    ('{"1": {"inputs": {}}}', "^node 1: 'class_type' .* it is missing"),
    ('{"1": {"class_type": "ksampler_CheckpointLoader", "inputs": {"ckpt_name": "flow"}}, "1": 5}',
     "^node 1: the workflow has two nodes with this id"),
    ('{"7": {"class_type": "a", "class_type": "b", "inputs": {}}}', "^node 7: the field 'class_type' is given twice"),
    ('{"3": {"class_type": "ksampler_EmptyLatentImage", "inputs": {"width": 32, "width": 48}}}',
     "^node 3: input 'width' is given twice"),
    ('{"3": {"class_type": "x", "inputs": {"v": [{"a": 1, "a": 2}]}}}', "^node 3: input 'v' .* the key 'a' twice"),
    ("[" * 100000 + "]" * 100000, "^workflow: .* nests JSON arrays or objects too deeply"),
    ("{", "^workflow: .* is not valid JSON"),
])
def test_malformed_workflow_files_name_the_node_and_field(tmp_path, text, match):
    path = tmp_path / "w.json"
    path.write_text(text)
    with pytest.raises(WorkflowError, match=match):
        Executor().validate(load_workflow(str(path)))


def test_workflow_with_a_byte_order_mark_loads(tmp_path):
    path = tmp_path / "w.json"
    path.write_text("\ufeff" + json.dumps({"1": GOOD_NODE}), encoding="utf-8")
    assert load_workflow(str(path)) == {"1": GOOD_NODE}


@pytest.mark.parametrize("graph, match", [
    ([1, 2], "^workflow: expected a non-empty JSON object .* got an array"),
    ({}, "^workflow: .* got an empty object"),
    ({1: GOOD_NODE}, "^node 1: node ids must be strings"),
    ({"1": GOOD_NODE, "2": {"class_type": "ksampler_VAEDecode", "inputs": {"samples": ["1", 0], "vae": ["3", 2]}},
      "3": "loader"}, "^node 3: expected an object"),
])
def test_executor_checks_the_structure_before_reading_links(graph, match):
    with pytest.raises(WorkflowError, match=match):
        Executor().validate(graph)


def _cli(*argv):
    return main([str(a) for a in argv])


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "holds an array"), ('"abc"', "holds a string"), ("5", "holds a number"), ("null", "holds null"),
    ('{"1": "x"}', "node 1: expected an object"),
    ('{"1": {"class_type": "ksampler_KSampler", "inputs": []}}', "node 1: 'inputs' must be an object"),
    ('{"1": {"class_type": ["x"], "inputs": {}}}', "node 1: 'class_type' must be a string"),
    ('{"1": {"class_type": "ksampler_CheckpointLoader", "inputs": {"ckpt_name": "flow"}}, "1": 5}',
     "node 1: the workflow has two nodes with this id"),
    ("[" * 100000 + "]" * 100000, "nests JSON arrays or objects too deeply"),
])
def test_cli_run_reports_malformed_workflows_in_one_line(tmp_path, capsys, text, message):
    path = tmp_path / "w.json"
    path.write_text(text)
    assert _cli("run", path, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err and err.count("\n") == 1, err


def test_cli_run_sorts_unicode_digit_node_ids(tmp_path, capsys):
    path = tmp_path / "w.json"
    path.write_text(json.dumps({"²": GOOD_NODE}))
    assert _cli("run", path, "--out", tmp_path / "out") == 2
    assert "it has no output node" in capsys.readouterr().err   # not "invalid literal for int()"


# ---- CLI generate -------------------------------------------------------------------------------------------------

def _generate(tmp_path, *extra):
    return _cli("generate", "--prompt", "red", "--steps", "1", "--batch-size", "1", "--no-progress",
                "--out", tmp_path / "out", *extra)


@pytest.mark.parametrize("extra, message", [
    (["--width", "160000", "--height", "160000"], "--width: at most 512"),
    (["--height", "528"], "--height: at most 512"),
    (["--scale", "100000"], "--scale: at most 16"),
    (["--scale", "17"], "--scale: at most 16"),
    (["--preview-steps", "/tmp"], "--preview-steps: expected the path of a .png file"),
    (["--preview-steps", "sheet.jpg"], "--preview-steps: expected the path of a .png file"),
    (["--prefix", "a" * 300], "--prefix: the file name part is 300 bytes long"),
    (["--prefix", "sub/x"], "--prefix: a file name prefix without folders"),
    (["--prefix", ""], "--prefix: expected a non-empty string"),
    (["--init-image", "/"], "--init-image: '/' is a folder"),
    (["--init-image", "/nonexistent/x.png"], "--init-image: file '/nonexistent/x.png' does not exist"),
])
def test_cli_generate_bad_flags_give_one_error_line(tmp_path, capsys, extra, message):
    assert _generate(tmp_path, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: " + message) and err.count("\n") == 1, err


def test_cli_generate_out_that_is_a_file_or_cannot_be_made(tmp_path, capsys):
    existing = tmp_path / "file.txt"
    existing.write_text("x")
    for out, message in ((existing, "is an existing file, not a folder"), (existing / "sub", "cannot create")):
        code = _cli("generate", "--prompt", "red", "--steps", "1", "--batch-size", "1", "--no-progress", "--out", out)
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: --out: ") and message in err, err


def test_cli_run_out_that_is_a_file(tmp_path, capsys):
    existing = tmp_path / "file.txt"
    existing.write_text("x")
    path = tmp_path / "w.json"
    path.write_text(json.dumps({"1": GOOD_NODE}))
    assert _cli("run", path, "--out", existing) == 2
    assert capsys.readouterr().err.startswith("error: --out: ")


def _raising(error):
    def generate(args):
        raise error
    return generate


@pytest.mark.parametrize("error", [
    ValueError("--calibrate: the file is damaged"),
    KSamplerInputError("eta: must be finite"),
    TypeError("pixels: expected an IMAGE tensor, got str"),
    OSError(28, "No space left on device"),
])
def test_cli_reports_input_errors_in_one_line(monkeypatch, capsys, error):
    import ksampler.__main__ as cli
    monkeypatch.setattr(cli, "generate", _raising(error))
    assert cli.main(["generate", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {error}\n"


def test_cli_reports_model_output_errors_in_one_line(monkeypatch, capsys):
    import ksampler.__main__ as cli
    from ksampler.guard import ModelOutputError, nonfinite_error
    for error in (nonfinite_error("denoised estimate", 2, 4, 1.5, "euler"), ModelOutputError("model: returned None")):
        monkeypatch.setattr(cli, "generate", _raising(error))
        assert cli.main(["generate", "--prompt", "x"]) == 2
        assert capsys.readouterr().err.startswith("error: model: ")


@pytest.mark.parametrize("error", [TypeError("unsupported operand type(s) for +: 'int' and 'str'"),
                                   AttributeError("'NoneType' object has no attribute 'x'"),
                                   ZeroDivisionError("division by zero"), KeyError("x")])
def test_cli_keeps_the_traceback_of_our_own_bugs(monkeypatch, error):
    import ksampler.__main__ as cli
    monkeypatch.setattr(cli, "generate", _raising(error))
    with pytest.raises(type(error)):
        cli.main(["generate", "--prompt", "x"])


class _Pass:
    RETURN_TYPES, FUNCTION, OUTPUT_NODE = ("INT",), "run", False

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"x": ("INT",)}}

    def run(self, x):
        return (x + 1,)


class _Out(_Pass):
    OUTPUT_NODE = True


def test_a_long_chain_of_nodes_runs_without_a_recursion_error():
    graph = {"0": {"class_type": "P", "inputs": {"x": 0}}}
    graph.update({str(k): {"class_type": "P", "inputs": {"x": [str(k - 1), 0]}} for k in range(1, 3000)})
    graph["3000"] = {"class_type": "O", "inputs": {"x": ["2999", 0]}}
    assert Executor({"P": _Pass, "O": _Out}).run(graph)["3000"] == (3001,)
