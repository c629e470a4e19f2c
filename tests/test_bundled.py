"""The bundled model: dataset generator, tokenizer, weights loading (and its errors), nodes, end-to-end sampling."""
import copy
import os
import subprocess
import sys

import pytest
import torch

from ksampler.models import DiffusionModel, EPS, Flow
from ksampler.bundled import dataset as D
from ksampler.bundled.loader import BundledModelError, load_bundled, load_weights, weights_path
from ksampler.bundled.nodes import (CheckpointLoader, EmptyLatentImage, LoadImage, SaveImage,
                                   TextEncode, VAEDecode, VAEEncode)
from ksampler.bundled.network import Tokenizer
from ksampler.nodes import KSampler, NODE_TABLE, NODES
from ksampler.pipeline import ksample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- dataset -----------------------------------------------------------------------------------
def test_dataset_is_deterministic_given_the_seed():
    a = D.make_batch(16, seed=3, two_shape_prob=0.3)
    b = D.make_batch(16, seed=3, two_shape_prob=0.3)
    c = D.make_batch(16, seed=4, two_shape_prob=0.3)
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (16, 3, 32, 32) and a[0].min() >= 0 and a[0].max() <= 1


def test_captions_use_only_the_vocabulary_and_name_the_truth():
    _, captions, scenes = D.make_batch(300, seed=1, two_shape_prob=0.2)
    tok = Tokenizer(D.VOCABULARY, 16, D.SYNONYMS)
    for text, scene in zip(captions, scenes):
        assert tok.unknown_words(text) == [], text
        if len(scene.objects) == 1:   # two-object captions may run past 16 words; the tokenizer cuts them
            assert len(tok.words(text)) <= 16, text
        first = scene.objects[0]
        assert first.shape in text or first.colour in text
    full = D.caption(scenes[0])
    obj = scenes[0].objects[0]
    for word in (obj.shape, obj.colour, obj.size, obj.position, scenes[0].background):
        assert word in full
    assert any(len(s.objects) == 2 for s in scenes) and any(" and " in c for c in captions)


def test_renderer_draws_the_named_colour_and_place():
    for colour in D.COLOURS:
        for position in D.POSITIONS:
            obj = D.ShapeSpec("square", colour, "small", position, *D.POSITIONS[position], 0.15)
            img = D.render([D.Scene((obj,), "plain", 0)])[0]
            x, y = (int(v * 32) for v in D.POSITIONS[position])
            assert torch.allclose(img[:, y, x], torch.tensor(D.COLOURS[colour]), atol=1e-4)
            assert torch.allclose(img[:, 0, 0], torch.tensor(D.BG_TONES[0]))


def test_prompt_parsing_and_reference_scene():
    attrs = D.parse_prompt("A LARGE red Circle in the centre!")
    assert attrs == {"shape": "circle", "colour": "red", "size": "large", "position": "center"}
    scene = D.scene_from_prompt("a small blue triangle at the top", seed=2)
    obj = scene.objects[0]
    assert (obj.shape, obj.colour, obj.size, obj.position) == ("triangle", "blue", "small", "top")


def test_tokenizer_maps_unknown_words_and_pads():
    tok = Tokenizer(D.VOCABULARY, 8, D.SYNONYMS)
    ids = tok.encode("a big zebra, centre!")
    assert len(ids) == 8 and ids[2] == 1 and ids[-1] == 0   # <unk>, then padding
    assert ids[1] == tok.index["large"] and ids[3] == tok.index["center"]
    assert tok.encode("") == [0] * 8
    assert len(tok.encode(" ".join(["red"] * 40))) == 8    # long prompts are truncated, never an error
    with pytest.raises(TypeError, match="text: expected a string"):
        tok.encode(None)


# ---- weights -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, sampling", [("eps", EPS), ("flow", Flow)])
def test_bundled_checkpoints_load(kind, sampling):
    path = weights_path(kind)
    assert os.path.getsize(path) <= 10 * 1024 * 1024
    model, clip, vae = load_bundled(kind)
    assert isinstance(model, DiffusionModel) and type(model.model_sampling) is sampling
    assert model.latent_format.latent_channels == 3 and model.latent_format.downscale == 1
    cond = clip.encode("a red circle")
    assert isinstance(cond, list) and len(cond) == 1 and cond[0][1] == {}
    assert cond[0][0].shape == (1, 16, model.network.cfg.text_dim)
    _, config = load_weights(path)
    assert config["kind"] == kind and config["prediction"] == kind
    record = os.path.splitext(path)[0] + ".json"
    assert os.path.isfile(record)


def test_eps_checkpoint_uses_sd_discrete_schedule():
    model, _, _ = load_bundled("eps")
    sigmas = model.model_sampling.sigmas
    assert len(sigmas) == 1000
    assert abs(float(sigmas[0]) - 0.0292) < 1e-3 and abs(float(sigmas[-1]) - 14.6146) < 1e-3


def _copy_weights(tmp_path, size=None, garbage=None):
    data = open(weights_path("flow"), "rb").read()
    if size is not None:
        data = data[:size]
    if garbage is not None:
        data = garbage
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("how", ["truncated", "header", "garbage", "empty"])
def test_corrupt_or_truncated_weights_name_the_file(tmp_path, how):
    full = os.path.getsize(weights_path("flow"))
    path = {"truncated": lambda: _copy_weights(tmp_path, size=full // 2),
            "header": lambda: _copy_weights(tmp_path, size=40),
            "garbage": lambda: _copy_weights(tmp_path, garbage=b"\xff" * 64),
            "empty": lambda: _copy_weights(tmp_path, garbage=b"")}[how]()
    with pytest.raises(BundledModelError, match=r"bad\.safetensors.*(corrupt or truncated)"):
        load_bundled(path=path)


def test_missing_weights_and_foreign_safetensors(tmp_path):
    with pytest.raises(BundledModelError, match=r"nope\.safetensors.*does not exist"):
        load_bundled(path=str(tmp_path / "nope.safetensors"))
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(BundledModelError, match=r"other\.safetensors.*no valid 'ksampler_config'"):
        load_bundled(path=str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="unknown bundled model 'sd15'"):
        load_bundled("sd15")


def test_no_pickle_loading_in_the_package():
    import ksampler
    root = os.path.dirname(ksampler.__file__)
    for folder, _, files in os.walk(root):
        if {"tests", ".git", ".venv"} & set(folder.split(os.sep)):
            continue
        for name in files:
            if name.endswith(".py"):
                text = open(os.path.join(folder, name), encoding="utf-8").read()
                assert "torch.load(" not in text and "import pickle" not in text, name


# ---- nodes -------------------------------------------------------------------------------------
def test_bundled_nodes_are_registered_with_comfy_contract():
    import ksampler.bundled.nodes as bundled_nodes
    bundled = {node_id: row for node_id, row in NODE_TABLE.items() if row[0] == "bundled.nodes"}
    assert len(bundled) == 7
    for node_id, (_, cls_name, name) in bundled.items():
        cls = getattr(bundled_nodes, cls_name)
        assert node_id.startswith("ksampler_") and NODES[node_id][0] is cls
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for inp, value in spec.get(section, {}).items():
                assert value[1].get("tooltip"), f"{node_id}.{inp} needs a tooltip"
        assert isinstance(cls.RETURN_TYPES, tuple) and hasattr(cls, cls.FUNCTION) and cls.CATEGORY
    # types of their own: the editor refuses to link them into ComfyUI's nodes, which expect other objects
    assert CheckpointLoader.RETURN_TYPES == ("KSAMPLER_BUNDLED_MODEL", "KSAMPLER_BUNDLED_CLIP",
                                             "KSAMPLER_BUNDLED_VAE")
    assert SaveImage.OUTPUT_NODE is True


def test_importing_the_nodes_stays_light():
    code = ("import sys, ksampler.bundled.nodes; "
            "bad = [m for m in ('ksampler.bundled.network', 'ksampler.bundled.loader', 'PIL') if m in sys.modules]; "
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    assert out.stdout.strip() == "[]", out.stderr


def test_empty_latent_and_node_input_errors():
    latent = EmptyLatentImage().generate(32, 48, 2)[0]
    assert latent["samples"].shape == (2, 3, 48, 32) and not latent["samples"].any()
    with pytest.raises(ValueError, match="width: must be a multiple of 16"):
        EmptyLatentImage().generate(40, 32, 1)
    with pytest.raises(ValueError, match="ckpt_name: unknown bundled checkpoint 'sd'"):
        CheckpointLoader().load_checkpoint("sd")
    with pytest.raises(ValueError, match="image: file .*missing.png.* does not exist"):
        LoadImage().load_image("missing.png", base_dir="/nonexistent")


def _txt2img(kind, prompt, steps=8, cfg=5.0, seed=0, batch=4):
    model, clip, vae = CheckpointLoader().load_checkpoint(kind)
    pos, neg = TextEncode().encode(prompt, clip)[0], TextEncode().encode("", clip)[0]
    latent = EmptyLatentImage().generate(32, 32, batch)[0]
    out = KSampler().sample(model, seed, steps, cfg, "dpmpp_2m", "karras", pos, neg, latent, 1.0)[0]
    return VAEDecode().decode(out, vae)[0]


def _dominant_colour(images):
    """The palette colour closest to the median of the pixels far from the border colour, per image."""
    x = images.permute(0, 3, 1, 2)
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=2).median(dim=2).values
    names, palette = list(D.COLOURS), torch.tensor(list(D.COLOURS.values()))
    out = []
    for img, bg in zip(x, border):
        mask = (img - bg[:, None, None]).abs().amax(dim=0) > 0.2
        colour = img[:, mask].median(dim=1).values if mask.sum() > 2 else bg
        out.append(names[int(((palette - colour) ** 2).sum(dim=1).argmin())])
    return out


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_txt2img_end_to_end_follows_the_prompt_colour(kind):
    images = _txt2img(kind, "a large red square in the center")
    assert images.shape == (4, 32, 32, 3) and images.min() >= 0 and images.max() <= 1
    assert _dominant_colour(images).count("red") >= 3
    blue = _txt2img(kind, "a large blue square in the center")
    assert _dominant_colour(blue).count("blue") >= 3


def test_img2img_end_to_end_through_the_nodes(tmp_path):
    from ksampler.bundled.images import save_png
    images, captions, _ = D.make_batch(2, seed=8, full_captions=True)
    for k in range(2):
        save_png(images[k].permute(1, 2, 0), str(tmp_path / f"in{k}.png"))
    model, clip, vae = CheckpointLoader().load_checkpoint("flow")
    pixels = LoadImage().load_image("in0.png", base_dir=str(tmp_path))[0]
    latent = VAEEncode().encode(pixels, vae)[0]
    snapshot = copy.deepcopy(latent)
    pos, neg = TextEncode().encode(captions[0], clip)[0], TextEncode().encode("", clip)[0]
    low = VAEDecode().decode(KSampler().sample(model, 1, 6, 5.0, "dpmpp_2m", "karras", pos, neg, latent, 0.3)[0],
                             vae)[0]
    full = VAEDecode().decode(KSampler().sample(model, 1, 6, 5.0, "dpmpp_2m", "karras", pos, neg, latent, 1.0)[0],
                              vae)[0]
    assert torch.equal(latent["samples"], snapshot["samples"])   # the caller's latent is untouched
    err_low = float((low - pixels).abs().mean())
    err_full = float((full - pixels).abs().mean())
    assert err_low < 0.05 and err_full > 2 * err_low
    saved = SaveImage().save_images(low, "sub/x", output_dir=str(tmp_path / "out"))
    assert saved["result"] == () and SaveImage.RETURN_TYPES == ()   # no outputs: it is a sink
    (entry,) = saved["ui"]["images"]
    assert entry["subfolder"] == "sub" and entry["type"] == "output"
    assert os.path.isfile(tmp_path / "out" / "sub" / entry["filename"])
    with pytest.raises(ValueError, match="filename_prefix: .* outside the output folder"):
        SaveImage().save_images(low, "../x", output_dir=str(tmp_path / "out"))


def test_vae_round_trip_and_input_checks():
    _, _, vae = load_bundled("flow")
    images = torch.rand(2, 32, 32, 3)
    assert torch.allclose(vae.decode(vae.encode(images)), images, atol=1e-6)
    rgba = torch.rand(1, 32, 32, 4)
    assert vae.encode(rgba).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="pixels: expected an IMAGE tensor"):
        vae.encode(torch.rand(1, 3, 32, 32))   # channels first by mistake
    with pytest.raises(ValueError, match="samples: expected a latent"):
        vae.decode(torch.rand(1, 4, 8, 8))
    with pytest.raises(ValueError, match="multiples of 16"):
        VAEEncode().encode(torch.rand(1, 30, 30, 3), vae)


def test_training_script_is_reproducible_and_loads(tmp_path):
    """tools/train.py with a fixed seed writes the same weights twice, and they load as a bundled model."""
    import importlib.util

    from safetensors.torch import load_file
    spec = importlib.util.spec_from_file_location("ks_train", os.path.join(ROOT, "tools", "train.py"))
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    paths = [str(tmp_path / f"run{i}.safetensors") for i in range(2)]
    for path in paths:
        train.main(["--kind", "flow", "--out", path, "--steps", "3", "--batch", "4", "--warmup", "1",
                    "--threads", "1", "--log-every", "1"])
    first, second = load_file(paths[0]), load_file(paths[1])
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    model, clip, vae = load_bundled(path=paths[0])
    out = ksample(model, 0, 2, 3.0, "euler", "simple", clip.encode("a red circle"), clip.encode(""),
                  {"samples": torch.zeros(1, 3, 32, 32)})
    assert out["samples"].shape == (1, 3, 32, 32) and torch.isfinite(out["samples"]).all()


def test_load_image_inside_comfyui_stays_in_the_input_folder(tmp_path, monkeypatch):
    """Inside the ComfyUI server (folder_paths present) only files in its input folder can be loaded."""
    import types

    from ksampler.bundled.images import save_png
    inputs, outside = tmp_path / "input", tmp_path / "secret"
    inputs.mkdir()
    outside.mkdir()
    save_png(torch.rand(8, 8, 3), str(inputs / "ok.png"))
    save_png(torch.rand(8, 8, 3), str(outside / "x.png"))
    fake = types.ModuleType("folder_paths")   # a stand-in for ComfyUI's folder_paths module
    fake.get_input_directory = lambda: str(inputs)
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    image, _ = LoadImage().load_image("ok.png")
    assert image.shape == (1, 8, 8, 3)
    for bad in ("../secret/x.png", str(outside / "x.png")):
        with pytest.raises(ValueError, match="outside ComfyUI's input folder"):
            LoadImage().load_image(bad)


def _fake_folder_paths(monkeypatch, tmp_path):
    """A stand-in for ComfyUI's folder_paths module, with input, output and temp folders under tmp_path."""
    import types
    fake = types.ModuleType("folder_paths")
    for kind in ("input", "output", "temp"):
        (tmp_path / kind).mkdir(exist_ok=True)
        setattr(fake, f"get_{kind}_directory", lambda kind=kind: str(tmp_path / kind))
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    return fake


def test_load_image_is_a_file_picker_inside_comfyui_and_a_path_headless(tmp_path, monkeypatch):
    from ksampler.bundled.images import save_png
    spec = LoadImage.INPUT_TYPES()["required"]["image"]
    assert spec[0] == "STRING" and spec[1]["default"] == "input.png"   # headless: a path
    _fake_folder_paths(monkeypatch, tmp_path)
    (tmp_path / "input" / "sub").mkdir()
    for name in ("b.png", "a.jpg", "sub/c.png"):
        save_png(torch.rand(8, 8, 3), str(tmp_path / "input" / name))
    (tmp_path / "input" / "notes.txt").write_text("not an image")
    choices, options = LoadImage.INPUT_TYPES()["required"]["image"]
    assert choices == ["a.jpg", "b.png", "sub/c.png"] and options["image_upload"] is True
    assert LoadImage().load_image("sub/c.png")[0].shape == (1, 8, 8, 3)


def test_save_image_previews_inside_comfyui_are_enlarged_copies(tmp_path, monkeypatch):
    from PIL import Image
    _fake_folder_paths(monkeypatch, tmp_path)
    saved = SaveImage().save_images(torch.rand(2, 32, 48, 3), "x")
    outputs = sorted(os.listdir(tmp_path / "output"))
    assert len(outputs) == 2 and all(Image.open(tmp_path / "output" / f).size == (48, 32) for f in outputs)
    previews = saved["ui"]["images"]
    assert [p["type"] for p in previews] == ["temp", "temp"]
    assert all(Image.open(tmp_path / "temp" / p["filename"]).size == (384, 256) for p in previews)
    big = SaveImage().save_images(torch.rand(1, 32, 32, 3), "y", scale=8)   # already large: the file itself
    assert big["ui"]["images"][0]["type"] == "output"
