"""Shared helpers of the benchmarks: tables, JSON results, environment facts."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import statistics
import sys
import time
from typing import Iterable, Sequence

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def require_ksampler():
    """Import the installed package, or stop with the command that installs it."""
    try:
        import ksampler  # noqa: F401
    except ImportError:
        sys.exit("bench: `import ksampler` failed; install the pack first: pip install '.[test]' (from the repo root)")
    return ksampler


def int_list(text: str) -> list[int]:
    """An argparse ``type``: comma-separated whole numbers ("5,10" -> [5, 10]), with the error naming the text."""
    import argparse
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated whole numbers, not {text!r}") from None


def environment() -> dict:
    import torch
    env = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        from importlib.metadata import version
        env["k_diffusion"] = version("k-diffusion")
    except Exception:  # not installed
        env["k_diffusion"] = None
    return env


def write_json(name: str, payload: dict) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, name)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=float)
    return path


@contextlib.contextmanager
def locked_json(name: str, empty: dict):
    """A results file's contents (``empty`` where there is none yet), written back on exit under a lock on the
    results folder, so that runs side by side can add to one file."""
    os.makedirs(RESULTS, exist_ok=True)
    folder = os.open(RESULTS, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        path = os.path.join(RESULTS, name)
        payload = empty
        if os.path.exists(path):
            with open(path) as f:
                payload = json.load(f)
        yield payload
        write_json(name, payload)
    finally:
        os.close(folder)  # and the lock with it


def fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v == float("inf"):
            return "inf"
        return f"{v:.{digits}g}"
    return str(v)


def table(headers: Sequence[str], rows: Iterable[Sequence], title: str | None = None) -> str:
    rows = [[fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = []
    if title:
        lines.append(f"\n## {title}")
    lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    return "\n".join(lines)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)
