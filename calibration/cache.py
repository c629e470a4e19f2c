"""Fitting once: the in-memory cache of calibrations and their files."""
from __future__ import annotations

import math
import os
from typing import Callable, Optional

from ..validation import KSamplerInputError
from .record import Calibration

_CACHE: "dict[str, Calibration]" = {}


def default_log(msg: str) -> None:
    print(msg, flush=True)


def cached_calibration(key: str, fit: Callable[[], Calibration], path: Optional[str] = None,
                       log: Callable[[str], None] = default_log, settings: Optional[dict] = None,
                       file_key: Optional[Callable[[], Optional[str]]] = None, steps: Optional[int] = None,
                       cfg: Optional[float] = None) -> Calibration:
    """The calibration for ``key``: from memory, else from ``path`` (checked to be for the same inputs), else fitted
    (once, saying so) and stored in memory and at ``path``.  ``settings``: the fit's settings in the key, named
    in the error when the file's differ.  ``file_key``: the key by the model's content (``calibration_key(...,
    by_content=True)``), computed only with a ``path``, so that a file fitted in another process (after a restart)
    loads for the same model and inputs.  ``steps``, ``cfg``: what the call asks for, which a file's own tensors
    and info must hold too (a file edited under its key is refused, not sampled at another step count)."""
    cal = _CACHE.get(key)
    if cal is not None:
        log(f"calibration: reusing the fitted schedule ({cal.steps} steps, key {key[:10]})")
        if path and os.path.exists(path):  # the file must still be this calibration's, as on a cache miss
            _load_matching(path, (key, cal.info.get("key")), file_key, settings, steps, cfg)
        elif path:  # fitted before a file was asked for: write it now
            _save(cal, path, file_key() if file_key is not None else None, log)
        return cal
    content_key = file_key() if (path and file_key is not None) else None  # the inputs as given, before a fit
    if path and os.path.exists(path):
        cal = _load_matching(path, (key,), lambda: content_key, settings, steps, cfg)
        log(f"calibration: loaded {path}")
        _CACHE[key] = cal
        return cal
    log(f"calibration: fitting once for these inputs (key {key[:10]}) ...")
    cal = fit()
    cal.info["key"] = key
    _CACHE[key] = cal
    if path:
        _save(cal, path, content_key, log)
    return cal


def _load_matching(path: str, keys: tuple, file_key: Optional[Callable[[], Optional[str]]],
                   settings: Optional[dict], steps: Optional[int] = None, cfg: Optional[float] = None) -> Calibration:
    """The calibration in ``path`` when it was fitted under one of ``keys`` (this process's key; on a cache hit
    also the cached calibration's own, which a file loaded from another process keeps), or for the content key
    ``file_key()`` (computed only when those differ), and holds ``steps`` steps at ``cfg`` (where given); else a
    ValueError naming calibration_file and the settings that differ."""
    cal = Calibration.load(path, name="calibration_file")
    if cal.info.get("key") in [k for k in keys if k is not None]:
        return _requested(cal, path, steps, cfg)
    content_key = file_key() if file_key is not None else None
    if content_key is not None and cal.info.get("file_key") == content_key:
        return _requested(cal, path, steps, cfg)
    differ = [f"{name}={cal.info[name]!r} (this call: {value!r})" for name, value in (settings or {}).items()
              if name in cal.info and cal.info[name] != value]
    if differ:
        raise ValueError(f"calibration_file: {path!r} was fitted with other settings: {', '.join(differ)}; "
                         "pass the file's settings to use it, or delete it to fit anew")
    raise ValueError(f"calibration_file: {path!r} holds a calibration fitted for other inputs (model, "
                     "conditioning, steps, cfg or settings); delete it or choose another file name")


def _requested(cal: Calibration, path: str, steps: Optional[int], cfg: Optional[float]) -> Calibration:
    """``cal`` (loaded from ``path`` under this call's key) when it holds ``steps`` steps at ``cfg``, else a
    ValueError naming calibration_file: the key matched, so the file was edited or damaged."""
    fitted_cfg = cal.info.get("cfg")
    if steps is not None and cal.steps != steps:
        found = f"{cal.steps} steps"
    elif cfg is not None and fitted_cfg is not None and not math.isclose(fitted_cfg, cfg, rel_tol=1e-6, abs_tol=1e-9):
        found = f"cfg {fitted_cfg:g}"
    else:
        return cal
    asked = " at ".join(part for part in (f"{steps} steps" if steps is not None else "",
                                          f"cfg {cfg:g}" if cfg is not None else "") if part)
    raise KSamplerInputError(f"calibration_file: {path!r} is keyed for this call ({asked}) but holds a calibration "
                             f"for {found} (edited or damaged); delete it to fit anew")


def _save(cal: Calibration, path: str, content_key: Optional[str], log: Callable[[str], None]) -> None:
    """Write ``cal`` to ``path`` with the key by the model's content (for other processes), if it has one."""
    if content_key is not None:
        cal.info["file_key"] = content_key
    cal.save(path, name="calibration_file")
    log(f"calibration: saved {path}")


def check_calibration_path(name: str, path) -> str:
    """A calibration file to load or write (``name``: the input): a .safetensors path (str or os.PathLike) in a
    folder that exists, naming a file or nothing yet (then in a folder where one can be written).  Returns it as
    a str."""
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str):
        raise KSamplerInputError(f"{name}: expected a file path (str), got {type(path).__name__} {path!r}")
    if "\x00" in path:
        raise KSamplerInputError(f"{name}: {path!r} contains a NUL character, which no file name may hold; remove it")
    if not path.endswith(".safetensors"):
        raise KSamplerInputError(f"{name}: {path!r} must end in .safetensors")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise KSamplerInputError(f"{name}: folder {folder!r} does not exist; create it first")
    if os.path.exists(path):
        if not os.path.isfile(path):
            what = "a folder" if os.path.isdir(path) else "not a regular file"
            raise KSamplerInputError(f"{name}: {path!r} is {what}; give the path of a calibration file (or of one "
                                     "to write)")
    else:  # a fit would write it: find out now whether a file can be written there, not after the fit
        import tempfile
        try:
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".ksampler-probe-", suffix=".safetensors"):
                pass
        except OSError as exc:
            raise KSamplerInputError(f"{name}: cannot write a new file in {folder!r} ({exc.strerror or exc}); choose "
                                     "a folder you can write to") from None
    return path


def clear_cache() -> None:
    _CACHE.clear()
