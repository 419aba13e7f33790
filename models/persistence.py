"""One way to save and load a trained torch module: ``<name>.pt`` + ``<name>.json``.

Layout written by :func:`save_module` into ``directory``::

    <name>.pt     torch.save of a dict of plain tensors only:
                  {"state_dict": {param/buffer name: Tensor}, <extra name>: Tensor, ...}
    <name>.json   {"class": type(module).__name__, "hparams": {...}, <extra JSON keys>...}

:func:`load_state` reads both back with ``torch.load(..., weights_only=True)``: a ``.pt`` file
holding anything but tensors and plain containers (a pickled object) is refused, so loading a
model never executes code from the file. Rebuilding the module from ``hparams`` and loading the
state dict is the caller's job (each model family knows its constructor).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

STATE_DICT_KEY = "state_dict"


class PersistenceError(ValueError):
    """A saved module's files are missing, unreadable or hold something other than tensors."""


def _plain_tensors(tensors: Mapping[str, Any], what: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, value in tensors.items():
        if not isinstance(value, Tensor):
            raise PersistenceError(f"{what}[{key!r}] is a {type(value).__name__}, not a tensor")
        out[str(key)] = value.detach().cpu()
    return out


def save_module(
    module: torch.nn.Module,
    directory: str | os.PathLike[str],
    hparams: Mapping[str, Any],
    name: str = "model",
    tensors: Mapping[str, Tensor] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``<name>.pt`` (``module``'s state dict plus the extra ``tensors``, all moved to CPU)
    and ``<name>.json`` (class name, ``hparams`` and the extra JSON keys of ``meta``) into
    ``directory`` (created if needed); return ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    extra = dict(tensors or {})
    if STATE_DICT_KEY in extra:
        raise ValueError(f"extra tensor name {STATE_DICT_KEY!r} is reserved for the state dict")
    blob: dict[str, Any] = {STATE_DICT_KEY: _plain_tensors(module.state_dict(), "state_dict")}
    blob.update(_plain_tensors(extra, "tensors"))
    doc = {**dict(meta or {}), "class": type(module).__name__, "hparams": dict(hparams)}
    text = json.dumps(doc, indent=2, sort_keys=True)  # fails before anything is written if not JSON
    torch.save(blob, directory / f"{name}.pt")
    (directory / f"{name}.json").write_text(text, encoding="utf-8")
    return directory


def load_state(
    directory: str | os.PathLike[str],
    name: str = "model",
    map_location: str | torch.device = "cpu",
    expected_class: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(tensors, spec)`` of a module written by :func:`save_module`.

    ``tensors``: ``{"state_dict": {...}, <extra name>: Tensor, ...}`` (``torch.load`` with
    ``weights_only=True``); ``spec``: the parsed ``<name>.json`` -- ``spec["hparams"]`` the
    hyper-parameters, ``spec["class"]`` the class name (checked against ``expected_class`` when
    both are given), plus the extra keys saved with it.
    """
    directory = Path(directory)
    json_path, pt_path = directory / f"{name}.json", directory / f"{name}.pt"
    for path in (json_path, pt_path):
        if not path.is_file():
            raise PersistenceError(f"saved module {directory} is missing {path.name}")
    try:
        spec = json.loads(json_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise PersistenceError(f"{json_path}: unreadable JSON: {exc}") from exc
    if not isinstance(spec, dict):
        raise PersistenceError(f"{json_path}: expected a JSON object")
    if expected_class is not None and spec.get("class") not in (None, expected_class):
        raise PersistenceError(f"{json_path} holds a {spec['class']}, not a {expected_class}")
    tensors = load_tensors(pt_path, map_location)
    if not isinstance(tensors.get(STATE_DICT_KEY), dict):
        raise PersistenceError(f"{pt_path} has no {STATE_DICT_KEY!r} dict")
    return tensors, spec


def load_tensors(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` of a dict (tensors and plain containers only)."""
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # UnpicklingError for a pickled object, RuntimeError for a bad zip
        raise PersistenceError(f"{path}: not a weights-only tensor file: {exc}") from exc
    if not isinstance(blob, dict):
        raise PersistenceError(f"{path}: expected a dict of tensors, got {type(blob).__name__}")
    return blob
