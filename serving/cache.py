"""The serving cache: verified local copies of registered versions (bundle + published index).

``kgrec serve`` used to download the champion into a fresh ``tempfile.mkdtemp`` on every start and
never remove it. :class:`ServeCache` keeps one copy per version instead::

    <root>/<model name>/v<version>/     a complete, verified copy (download_version's layout)
        model/artifacts/bundle/         the bundle (its MANIFEST.json)
        index/                          the published index (its MANIFEST.json), when there is one
        cache.json                      what was fetched: run_id, source, index tag, relative paths
    <root>/<model name>/.v<version>.lock        a file lock per version (never deleted)
    <root>/<model name>/.v<version>.tmp-<pid>-*  a download in progress (or of a dead process)

Root: ``ServeCache(root)``, else ``$KGREC_HOME/serve-cache`` when ``KGREC_HOME`` is set, else
``~/.cache/kgrec/serve``.

:meth:`ServeCache.fetch` holds the version's lock (uvicorn workers fetching the same version wait
for the first instead of racing), removes what dead fetches of that version left, reuses an
existing copy when it is of the same run and source and passes its manifests (a fast restart: no
download), else downloads into a temp directory under the root, verifies the manifests (and the
index manifest's digest recorded in the registry at publishing, when there is one) and renames the
directory into place, so a crash never leaves a half copy where a reader looks. A cached copy that
fails verification is evicted and downloaded again; a fresh download that fails raises
:class:`~kgrec.serving.integrity.IntegrityError` (what was published is damaged).
:meth:`ServeCache.prune` removes the versions of a model not kept (the service keeps the current and
the previous one after a swap).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from kgrec.models.tracking.registry import INDEX_TAG, download_version
from kgrec.serving.bundle import verify_manifest as verify_bundle
from kgrec.serving.integrity import (
    INDEX_MANIFEST_TAG,
    MANIFEST_FILE,
    IntegrityError,
    manifest_digest,
    verify_manifest,
)
from mlflow.entities.model_registry import ModelVersion

logger = logging.getLogger("kgrec.serving")

HOME_ENV = "KGREC_HOME"
CACHE_INFO = "cache.json"
LOCK_TIMEOUT_SECONDS = 900.0
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def default_root() -> Path:
    """``$KGREC_HOME/serve-cache`` when ``KGREC_HOME`` is set, else ``~/.cache/kgrec/serve``."""
    home = os.environ.get(HOME_ENV)
    return Path(home) / "serve-cache" if home else Path.home() / ".cache" / "kgrec" / "serve"


def _safe(name: str) -> str:
    """A registered model name as one path component."""
    safe = _SAFE.sub("_", name).strip(".")
    if not safe:
        raise ValueError(f"model name {name!r} gives no usable folder name")
    return safe


@dataclass(frozen=True)
class CachedVersion:
    """A verified local copy of one version: where its bundle and index are."""

    name: str
    version: str
    directory: Path
    bundle_dir: Path
    index_dir: Path | None
    downloaded: bool  # False: an existing copy was reused


class ServeCache:
    """Verified local copies of registered versions under one root folder (module docstring)."""

    def __init__(
        self, root: str | os.PathLike[str] | None = None, lock_timeout: float = LOCK_TIMEOUT_SECONDS
    ) -> None:
        self.root = Path(root) if root is not None else default_root()
        self.lock_timeout = lock_timeout

    def __repr__(self) -> str:
        return f"ServeCache({str(self.root)!r})"

    # ------------------------------------------------------------------ layout
    def model_dir(self, name: str) -> Path:
        return self.root / _safe(name)

    def version_dir(self, name: str, version: str | int) -> Path:
        return self.model_dir(name) / f"v{version}"

    def lock(self, name: str, version: str | int, timeout: float | None = None) -> FileLock:
        """The file lock of one cached version (shared by every process on this machine)."""
        path = self.model_dir(name) / f".v{version}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(path), timeout=self.lock_timeout if timeout is None else timeout)

    def versions(self, name: str) -> list[str]:
        """The versions of ``name`` with a complete copy in the cache, oldest first."""
        folder = self.model_dir(name)
        if not folder.is_dir():
            return []
        found = [p.name[1:] for p in folder.iterdir()
                 if p.is_dir() and p.name.startswith("v") and (p / CACHE_INFO).is_file()]
        return sorted(found, key=lambda v: (len(v), v))

    # ------------------------------------------------------------------ fetch
    def fetch(self, version: ModelVersion) -> CachedVersion:
        """A verified local copy of ``version`` (bundle + published index): reused when the cache
        holds a good one, else downloaded (temp directory under the root, verified, renamed)."""
        name, number = str(version.name), str(version.version)
        target = self.version_dir(name, number)
        with self.lock(name, number):
            self._remove_leftovers(name, number)
            if target.is_dir():
                try:
                    cached = self._reuse(version, target)
                except IntegrityError as exc:
                    logger.warning("cached copy of %s v%s fails verification (%s): downloading it again",
                                   name, number, exc)
                    cached = None
                if cached is not None:
                    logger.info("serving %s v%s from the cache at %s", name, number, target)
                    return cached
                self._evict(target)
            return self._download(version, target)

    def _reuse(self, version: ModelVersion, target: Path) -> CachedVersion | None:
        """The cached copy at ``target`` if it is of this very version and passes its manifests;
        None when it is of another registration (stale); raises IntegrityError when it is damaged."""
        try:
            record = json.loads((target / CACHE_INFO).read_text())
            bundle_rel, index_rel = str(record["bundle"]), record.get("index")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("cached copy %s has no readable %s (%s): fetching it again", target, CACHE_INFO, exc)
            return None
        if record.get("run_id") != version.run_id or record.get("source") != version.source:
            logger.info("cached copy %s is of another registration (run %s): fetching it again",
                        target, record.get("run_id"))
            return None
        if record.get("index_artifact") != (version.tags or {}).get(INDEX_TAG):
            logger.info("cached copy %s predates the version's index: fetching it again", target)
            return None
        bundle_dir = target / bundle_rel
        index_dir = None if index_rel is None else target / str(index_rel)
        self._verify(version, bundle_dir, index_dir)
        return CachedVersion(str(version.name), str(version.version), target, bundle_dir, index_dir, False)

    def _download(self, version: ModelVersion, target: Path) -> CachedVersion:
        name, number = str(version.name), str(version.version)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".v{number}.tmp-{os.getpid()}-", dir=target.parent))
        try:
            bundle_dir, index_dir = download_version(version, tmp)
            self._verify(version, bundle_dir, index_dir)
            record: dict[str, Any] = {
                "name": name,
                "version": number,
                "run_id": version.run_id,
                "source": version.source,
                "index_artifact": (version.tags or {}).get(INDEX_TAG),
                "bundle": bundle_dir.relative_to(tmp).as_posix(),
                "index": None if index_dir is None else index_dir.relative_to(tmp).as_posix(),
            }
            (tmp / CACHE_INFO).write_text(json.dumps(record, indent=2, sort_keys=True))  # last: complete
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("fetched %s v%s into the cache at %s", name, number, target)
        bundle_dir = target / record["bundle"]
        index_dir = None if record["index"] is None else target / record["index"]
        return CachedVersion(name, number, target, bundle_dir, index_dir, True)

    @staticmethod
    def _verify(version: ModelVersion, bundle_dir: Path, index_dir: Path | None) -> None:
        """Both manifests, and the index manifest against the digest publishing recorded."""
        if not bundle_dir.is_dir():
            raise IntegrityError(f"{version.name} v{version.version}: no bundle at {bundle_dir}",
                                 directory=bundle_dir, reason="no bundle")
        verify_bundle(bundle_dir)
        if index_dir is None:
            return
        verify_manifest(index_dir, "index")
        published = (version.tags or {}).get(INDEX_MANIFEST_TAG)
        if published:
            actual = manifest_digest(index_dir)
            if actual != published:
                reason = (f"{MANIFEST_FILE} is not the one published with {version.name} v{version.version} "
                          f"(sha256 {str(actual)[:12]}..., registry says {published[:12]}...)")
                raise IntegrityError(f"index {index_dir}: {reason}", directory=index_dir,
                                     file=MANIFEST_FILE, reason=reason)

    # ------------------------------------------------------------------ cleanup
    def _remove_leftovers(self, name: str, number: str) -> None:
        """Temp and evicted directories of one version (call with its lock held: nobody else can be
        writing them, so they are what a dead fetch left)."""
        folder = self.model_dir(name)
        for prefix in (f".v{number}.tmp-", f".v{number}.old-"):
            for path in folder.glob(f"{prefix}*"):
                logger.info("removing %s (left by an interrupted fetch)", path)
                shutil.rmtree(path, ignore_errors=True)

    def _evict(self, target: Path) -> None:
        """Move a cached copy out of the way (one rename), then delete it."""
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
        shutil.rmtree(old, ignore_errors=True)

    def prune(self, name: str, keep: Iterable[str | int]) -> list[str]:
        """Remove the cached versions of ``name`` not in ``keep`` (and what dead fetches of them
        left); returns the versions removed. A version another process is fetching right now (its
        lock is held) is left alone."""
        folder = self.model_dir(name)
        if not folder.is_dir():
            return []
        kept = {str(v) for v in keep}
        numbers = set()
        for path in folder.iterdir():
            match = re.fullmatch(r"\.?v([^.]+?)(?:\.(?:tmp|old)-.*)?", path.name)
            if path.is_dir() and match:
                numbers.add(match.group(1))
        removed = []
        for number in sorted(numbers - kept, key=lambda v: (len(v), v)):
            try:
                with self.lock(name, number, timeout=0):
                    self._remove_leftovers(name, number)
                    target = self.version_dir(name, number)
                    if target.is_dir():
                        self._evict(target)
                        removed.append(number)
            except Timeout:
                logger.info("not pruning %s v%s: another process is fetching it", name, number)
        if removed:
            logger.info("pruned %s versions %s from the serving cache", name, ", ".join(removed))
        return removed
