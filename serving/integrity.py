"""Checksum manifests of the serving artefacts (bundles of every kind, faiss indices).

Every artefact directory ends with ``MANIFEST.json``, written last (inside the atomic temp
directory of :func:`kgrec.serving.files.atomic_directory`, after every other file)::

    {"version": 1, "algorithm": "sha256",
     "files": {relative POSIX path: {"sha256": hex, "size": bytes}}}    every other file, recursively

:func:`verify_manifest` checks a directory against it before anything reads the files: a listed
file missing, or its size or sha256 changed, raises :class:`IntegrityError` naming the file and the
mismatch (``error.file``, ``error.reason``). Unlisted files are ignored (logged). A directory
without a manifest (written before manifests existed) passes unverified with a warning, unless
``required``. Loaders (``Bundle.load``, ``load_index``, the serving cache) call it; a service that
gets an :class:`IntegrityError` is not ready, with the error as its reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

logger = logging.getLogger("kgrec.serving")

MANIFEST_FILE = "MANIFEST.json"
MANIFEST_VERSION = 1
ALGORITHM = "sha256"
#: Model-version tag holding the sha256 of the published index's MANIFEST.json (set by publishing,
#: checked by the serving cache): pins the index to what was published, even if the store's copy of
#: the manifest were rewritten along with the files.
INDEX_MANIFEST_TAG = "kgrec.index_manifest_sha256"
_CHUNK = 1 << 20


class IntegrityError(ValueError):
    """An artefact directory fails its manifest: a listed file is missing, or its size or checksum
    changed, or the manifest itself is unreadable. ``directory``, ``file`` (None for the manifest as
    a whole) and ``reason`` say which and why; ``str(error)`` says all three."""

    def __init__(
        self, message: str, *, directory: str | os.PathLike[str] | None = None,
        file: str | None = None, reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.directory = None if directory is None else Path(directory)
        self.file = file
        self.reason = reason or message


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def listed_files(directory: str | os.PathLike[str]) -> list[str]:
    """Relative POSIX paths of every file under ``directory`` but its top-level manifest, sorted."""
    directory = Path(directory)
    names = (p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    return sorted(n for n in names if n != MANIFEST_FILE)


def write_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Write ``MANIFEST.json`` (sha256 and size of every other file, recursively) and return it.

    Call it last, once every other file of the artefact is written (and still inside the atomic
    temp directory), so a manifest's presence means the artefact was complete when it was signed.
    """
    directory = Path(directory)
    files = {
        name: {"sha256": sha256_file(directory / name), "size": (directory / name).stat().st_size}
        for name in listed_files(directory)
    }
    manifest = {"version": MANIFEST_VERSION, "algorithm": ALGORITHM, "files": files}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def read_manifest(
    directory: str | os.PathLike[str], what: str = "artefact", error: type[IntegrityError] = IntegrityError,
) -> dict[str, tuple[int, str]] | None:
    """``{relative path: (size, sha256)}`` of ``directory``'s manifest, None when it has none;
    raises ``error`` when it is unreadable or lists a path outside the directory."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not path.is_file():
        return None

    def fail(reason: str) -> IntegrityError:
        return error(f"{what} {directory}: {reason}", directory=directory, file=MANIFEST_FILE, reason=reason)

    try:
        manifest = json.loads(path.read_text())
        if manifest.get("algorithm", ALGORITHM) != ALGORITHM:
            raise ValueError(f"unknown algorithm {manifest.get('algorithm')!r}")
        files: dict[str, dict[str, Any]] = manifest["files"]
        entries = {str(name): (int(e["size"]), str(e["sha256"])) for name, e in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise fail(f"unreadable {MANIFEST_FILE}: {exc!r}") from exc
    for name in entries:
        pure = PurePosixPath(name)
        if not name or pure.is_absolute() or ".." in pure.parts or name == MANIFEST_FILE:
            raise fail(f"{MANIFEST_FILE} lists an invalid path {name!r}")
    return entries


def verify_manifest(
    directory: str | os.PathLike[str],
    what: str = "artefact",
    *,
    required: bool = False,
    later: Iterable[str] = (),
    error: type[IntegrityError] = IntegrityError,
) -> bool:
    """Check ``directory`` against its ``MANIFEST.json``; True when it passed.

    ``what`` names the artefact in messages (``"bundle"``, ``"index"``). Without a manifest: False
    and a warning (an artefact written before manifests), or ``error`` if ``required``. Raises
    ``error`` (an :class:`IntegrityError` subclass) naming the first listed file that is missing or
    whose size (checked first: cheap) or sha256 differs. Unlisted files are ignored with a warning,
    quietly (debug) when their top-level folder is in ``later`` (parts added after writing, such as a
    bundle's ``index/``).
    """
    directory = Path(directory)
    entries = read_manifest(directory, what, error)
    if entries is None:
        if required:
            reason = f"no {MANIFEST_FILE}"
            raise error(f"{what} {directory} has {reason}", directory=directory, file=MANIFEST_FILE, reason=reason)
        logger.warning("%s %s has no %s (written before checksummed artefacts): loading it unverified",
                       what, directory, MANIFEST_FILE)
        return False
    missing = [name for name in sorted(entries) if not (directory / name).is_file()]
    if missing:
        reason = f"missing {', '.join(missing)} (listed in {MANIFEST_FILE})"
        raise error(f"{what} {directory} is {reason}", directory=directory, file=missing[0], reason=reason)
    for name, (size, _) in sorted(entries.items()):
        actual = (directory / name).stat().st_size
        if actual != size:
            reason = f"{name} has {actual} bytes, {MANIFEST_FILE} says {size}"
            raise error(f"{what} {directory}: {reason}", directory=directory, file=name, reason=reason)
    for name, (_, sha) in sorted(entries.items()):
        actual_sha = sha256_file(directory / name)
        if actual_sha != sha:
            reason = (f"{name} fails its checksum (sha256 {actual_sha[:12]}..., "
                      f"{MANIFEST_FILE} says {sha[:12]}...)")
            raise error(f"{what} {directory}: {reason}", directory=directory, file=name, reason=reason)
    extra = [n for n in listed_files(directory) if n not in entries]
    if extra:
        later = set(later)
        added = [n for n in extra if n.split("/", 1)[0] in later]
        unknown = [n for n in extra if n not in added]
        if unknown:
            logger.warning("%s %s: ignoring files not in %s: %s", what, directory, MANIFEST_FILE, ", ".join(unknown))
        if added:
            logger.debug("%s %s: %d files added after writing", what, directory, len(added))
    return True


def manifest_digest(directory: str | os.PathLike[str]) -> str | None:
    """sha256 of ``directory``'s ``MANIFEST.json`` (None without one): one value that pins every
    file of the artefact, recorded in the registry by publishing."""
    path = Path(directory) / MANIFEST_FILE
    return sha256_file(path) if path.is_file() else None
