"""Atomic directory writes for the serving artefacts (bundles of every kind, faiss indices)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_directory(directory: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a sibling temp directory to fill; on success it replaces ``directory`` in one rename.

    Readers never see a half-written artefact: if the body raises, the temp directory is removed
    and an existing ``directory`` is left untouched; an existing one is swapped out (and restored
    if the final rename fails).
    """
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(tmp: Path, target: Path) -> None:
    """Move ``tmp`` to ``target``; an existing target is swapped out and then removed."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{id(tmp)}")
        os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            os.replace(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
