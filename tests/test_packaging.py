"""Registry readiness: pyproject.toml against the Comfy Registry's specification and standards, requirements.txt
against what ComfyUI already installs, and a scan of the pack's code for what the standards forbid."""
import ast
import re
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
COMFY = PYPROJECT["tool"]["comfy"]

# In ComfyUI's own requirements.txt (January 2026 and later): a node pack must leave them to the host.
HOST_PACKAGES = {"torch", "torchsde", "torchvision", "torchaudio", "numpy", "safetensors", "pillow", "tqdm", "scipy",
                 "einops", "transformers", "tokenizers", "sentencepiece", "aiohttp", "pyyaml", "psutil", "av"}
# What ComfyUI's registry parser accepts (comfy_config/config_parser.py); any other entry voids the whole list.
REGISTRY_OS = ("Microsoft", "POSIX", "MacOS", "OS Independent")
REGISTRY_ACCELERATORS = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend",
                         "GPU :: Apple Metal"}
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([^;#]*)")


def _requirement(line: str) -> tuple[str, str]:
    """(normalised name, version specifier) of one requirement line."""
    name, _extras, spec = REQUIREMENT.match(line).groups()
    return re.sub(r"[-_.]+", "-", name).lower(), spec.strip()


def _requirements_txt() -> list[str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [ln.split("#", 1)[0].strip() for ln in lines if ln.split("#", 1)[0].strip()]


def test_tool_comfy_section_has_the_registry_fields():
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", COMFY["PublisherId"])
    assert COMFY["DisplayName"].strip()
    icon = COMFY["Icon"]
    assert re.fullmatch(r"https://\S+\.(png|svg|jpg|jpeg|gif)", icon)
    assert re.fullmatch(r"\s*(>=|>|==|~=)\s*\d+(\.\d+)*(\s*,\s*(<|<=)\s*\d+(\.\d+)*)?\s*", COMFY["requires-comfyui"])


def test_icon_is_a_file_of_the_pack_within_the_registry_limit():
    """The Icon URL points at a file of this repository, at most 800 x 400 pixels."""
    from PIL import Image
    relative = COMFY["Icon"].split("/main/", 1)[1]
    with Image.open(ROOT / relative) as icon:
        assert icon.width <= 800 and icon.height <= 400


def test_project_section_follows_the_registry_specification():
    name = PROJECT["name"]
    assert len(name) < 100 and re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]*", name)
    assert not re.search(r"[_.-]{2}", name) and "comfyui" not in name.lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", PROJECT["version"])
    assert set(PROJECT["license"]) <= {"text", "file"} and PROJECT["license"]
    assert PROJECT["description"].strip() and PROJECT["requires-python"].startswith(">=")
    assert PROJECT["urls"]["Repository"].startswith("https://")
    for classifier in PROJECT["classifiers"]:
        if classifier.startswith("Operating System :: "):
            assert classifier[len("Operating System :: "):].startswith(REGISTRY_OS), classifier
        if classifier.startswith("Environment ::"):
            assert classifier[len("Environment :: "):] in REGISTRY_ACCELERATORS, classifier


def test_no_dependency_caps_or_pins_a_version_the_host_could_have():
    """Headless installs still get torch & co. from pyproject, with lower bounds only: never a newer torch blocked."""
    deps = dict(_requirement(d) for d in PROJECT["dependencies"])
    assert "torch" in deps
    for name, spec in deps.items():
        assert not re.search(r"<|==|~=|!=|===", spec), f"{name}{spec}"


def test_requirements_txt_lists_only_what_comfyui_lacks_unpinned():
    lines = _requirements_txt()
    deps = dict(_requirement(d) for d in PROJECT["dependencies"])
    for line in lines:
        name, spec = _requirement(line)
        assert name not in HOST_PACKAGES, f"requirements.txt: {name} comes with ComfyUI"
        assert not re.search(r"<|==|~=|!=|===", spec), line
        assert name in deps, f"requirements.txt: {name} is missing from pyproject's dependencies"
    for name in deps:
        assert name in HOST_PACKAGES or name in {_requirement(ln)[0] for ln in lines}, \
            f"{name}: a dependency ComfyUI lacks must be in requirements.txt"


def _pack_sources():
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).parts
        if parts[0] in {".venv", "venv", "build", "dist"} or any(p.startswith(".") for p in parts):
            continue
        yield path


FORBIDDEN_CALLS = {"eval", "exec", "compile"}
FORBIDDEN_MODULES = {"pickle", "dill", "marshal", "shelve", "cloudpickle", "urllib", "requests", "http", "socket",
                     "httpx", "aiohttp", "huggingface_hub", "ftplib", "pip", "ensurepip"}


@pytest.mark.parametrize("path", list(_pack_sources()), ids=lambda p: str(p.relative_to(ROOT)))
def test_code_has_no_eval_exec_pickle_network_or_runtime_pip(path):
    """The registry's security standards, on every Python file of the pack (tests and tools included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name):
                assert func.id not in FORBIDDEN_CALLS, f"{where}: {func.id}()"
            if isinstance(func, ast.Attribute):
                owner = ast.unparse(func.value)
                assert not (owner == "torch" and func.attr == "load"), f"{where}: torch.load unpickles"
                assert not (owner == "os" and func.attr in {"system", "popen"}), f"{where}: os.{func.attr}"
                if owner == "subprocess":
                    words = [c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str)]
                    assert "pip" not in words and "install" not in words, f"{where}: runtime pip"
        if isinstance(node, ast.Import):
            for alias in node.names:
                assert alias.name.split(".")[0] not in FORBIDDEN_MODULES, f"{where}: import {alias.name}"
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            assert node.module.split(".")[0] not in FORBIDDEN_MODULES, f"{where}: from {node.module}"
