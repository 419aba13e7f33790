"""Items posted to the service (``POST /v1/items``): their durable overlay file and their live state.

**The overlay file.** Every accepted item is one JSON line, appended beside the served bundle in the
serve cache, keyed by registered model and version::

    <serve cache root>/<model name>/overlays/v<version>.jsonl
        {"item_id": "1682", "name": "Scream of Stone", "facts": [{"relation": "film.film.genre",
         "entity": "m.02kdv5l"}, ...], "time": "2026-11-30T09:12:04.512Z", "model": "kgrec-ml-100k",
         "version": "3"}
    <serve cache root>/<model name>/overlays/v<version>.jsonl.lock      its file lock

It lives next to the cached versions, not inside ``v<version>/``: the cache evicts and prunes those
directories (a damaged copy is downloaded again, old versions are removed after a swap), and an
overlay must outlive both. Facts are stored by raw name (relation name, entity id), not by index,
so any later model -- the next training run (:func:`read_overlay_items`,
:func:`kgrec.features.overlay.merge_overlay_items`) or another version -- can read them.

An append holds the file lock (``filelock``: ``flock`` on the lock file, one per process and
open, so two workers -- or two apps in one test process -- exclude each other), repairs a torn last
line left by a writer that died mid-write (it was never answered 201: the answer waits for the
fsync), re-reads what other writers appended since this process last read (and applies it), decides
duplicates on that fresh state, writes the line, flushes and ``fsync``\\ s it (and the directory when
the file is new), and only then answers. Two workers posting the same id at once: the second to get
the lock reads the first one's line and answers 409. Readers never take the lock: they read whole
lines only (a line is complete once its newline is there) and remember the offset after the last one.

**Live state** (:class:`PostedItems`, one per loaded version): the item vectors come from the served
bundle's :class:`~kgrec.serving.inductive.ItemEmbedder` and go into the retriever's posted segment
(:meth:`kgrec.serving.candidates.CandidateService.add_items`). When a version loads, it applies the
overlays of the model's OTHER versions first (items posted while an older version served, that this
version does not have in its catalogue: the served catalogue only grows when the alias moves; a
version that cannot embed them logs how many it lacks) and then its own. Afterwards, items other
worker processes append are picked up by :meth:`PostedItems.catch_up`: the service checks the
files' sizes and mtimes every ``overlay_poll_interval_s`` (one ``stat`` per file; default 1 s), and
a post catches up before it decides. A candidate request never looks at the files.

Duplicates are decided per file, under its lock. During a rollover (some workers on the old
version, some on the new) the same new id posted to both at once can be accepted by each -- two
records of one id, in two files: every reader keeps the first (``has_item``, the training merge), so
the catalogue still holds one item.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from kgrec.features.overlay import OverlayItem
from kgrec.serving.cache import ServeCache
from kgrec.serving.candidates import DuplicateItemError
from kgrec.serving.errors import CandidateError, ServiceUnavailable, quote_input
from kgrec.serving.inductive import FactError

log = logging.getLogger("kgrec.serving")

OVERLAY_DIRNAME = "overlays"
SUFFIX = ".jsonl"
LOCK_TIMEOUT_S = 30.0
_VERSION_FILE = re.compile(r"v(.+)\.jsonl")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class CannotPostItemsError(CandidateError):
    """The served model cannot take posted items (no inductive embedding, or no overlay store): 409.

    409 rather than 422: the request is well-formed and would be accepted by a version that can
    embed new items (a KGAT champion); it conflicts with what is served now, not with its body."""

    status_code = 409


# ---------------------------------------------------------------------------- the file
def overlay_dir(root: str | os.PathLike[str], model_name: str) -> Path:
    """``<root>/<model name>/overlays`` (the model's folder of the serve cache)."""
    return ServeCache(root).model_dir(model_name) / OVERLAY_DIRNAME


def _version_key(version: str) -> tuple[int, int | str]:
    return (0, int(version)) if version.isdigit() else (1, version)


class ItemOverlay:
    """The append-only overlay file of one registered model version (module docstring)."""

    def __init__(self, root: str | os.PathLike[str], model_name: str, version: str | int,
                 lock_timeout: float = LOCK_TIMEOUT_S) -> None:
        self.model_name, self.version = str(model_name), str(version)
        safe = _UNSAFE.sub("_", self.version).strip(".") or "_"  # one file name, whatever a loader calls it
        self.path = overlay_dir(root, self.model_name) / f"v{safe}{SUFFIX}"
        self._lock = FileLock(str(self.path) + ".lock", timeout=lock_timeout)

    def __repr__(self) -> str:
        return f"ItemOverlay({str(self.path)!r})"

    def stat(self) -> tuple[int, int] | None:
        """``(size, mtime_ns)`` of the file, None while it does not exist."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_size, st.st_mtime_ns

    def read_from(self, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
        """The records of the complete lines from byte ``offset`` on and the offset after the last
        complete line (a line still being written is left for the next read). Lines that are not
        JSON objects are logged and skipped."""
        try:
            with open(self.path, "rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return [], offset
        end = data.rfind(b"\n") + 1
        records = []
        for number, line in enumerate(data[:end].splitlines()):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict) or not isinstance(record.get("item_id"), str):
                log.warning("%s: skipping a malformed line (%d bytes after offset %d, line %d)",
                            self.path.name, len(line), offset, number)
                continue
            records.append(record)
        return records, offset + end

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the file lock; a torn last line (a writer died mid-write) is cut off first. Waiting
        longer than the lock timeout is a :class:`ServiceUnavailable` (503: try again)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except Timeout as exc:
            raise ServiceUnavailable(f"the overlay {self.path.name} is locked by another process: try again") from exc
        try:
            self._repair()
            yield
        finally:
            self._lock.release()

    def _repair(self) -> None:
        try:
            with open(self.path, "rb+") as f:
                size = f.seek(0, os.SEEK_END)
                if size == 0:
                    return
                f.seek(size - 1)
                if f.read(1) == b"\n":
                    return
                f.seek(max(0, size - (1 << 20)))
                tail = f.read()
                keep = size - len(tail) + tail.rfind(b"\n") + 1 if b"\n" in tail else max(0, size - len(tail))
                log.warning("%s: cutting a torn last line (%d bytes) left by an interrupted write",
                            self.path.name, size - keep)
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())
        except FileNotFoundError:
            return

    def append(self, record: dict[str, Any]) -> int:
        """Write one record as a line, flush and fsync it (call under :meth:`locked`); returns the
        offset after it."""
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
        created = not self.path.exists()
        with open(self.path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
            end = f.tell()
        if created:  # the new directory entry is durable too
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return end


def model_overlays(root: str | os.PathLike[str], model_name: str) -> list[ItemOverlay]:
    """The overlay files of every version of ``model_name`` under ``root``, oldest version first."""
    folder = overlay_dir(root, model_name)
    if not folder.is_dir():
        return []
    versions = [m.group(1) for p in folder.iterdir() if p.is_file() and (m := _VERSION_FILE.fullmatch(p.name))]
    return [ItemOverlay(root, model_name, v) for v in sorted(versions, key=_version_key)]


def as_overlay_item(record: dict[str, Any]) -> OverlayItem | None:
    """An overlay line as :class:`~kgrec.features.overlay.OverlayItem` (None when malformed)."""
    try:
        facts = tuple((str(f["relation"]), str(f["entity"])) for f in record["facts"])
        name = record.get("name")
        return OverlayItem(str(record["item_id"]), facts, None if name is None else str(name))
    except (KeyError, TypeError, ValueError):
        return None


def read_overlay_items(root: str | os.PathLike[str], model_name: str) -> list[OverlayItem]:
    """Every item posted to any version of ``model_name`` (the training merge's input): oldest version
    first, file order within one, the first record of an id kept."""
    items: dict[str, OverlayItem] = {}
    for overlay in model_overlays(root, model_name):
        records, _ = overlay.read_from(0)
        for record in records:
            item = as_overlay_item(record)
            if item is not None and item.item_id not in items:
                items[item.item_id] = item
    return list(items.values())


# ---------------------------------------------------------------------------- live state
@dataclass(frozen=True)
class PostResult:
    item_id: str
    position: int
    n_items: int
    facts: int
    embedding: dict[str, Any]


class PostedItems:
    """The posted items of one loaded version: applies overlays, accepts posts (module docstring).

    ``retriever``: the version's retriever; it takes posted items when it has ``add_items`` and an
    ``item_embedder`` (a KGAT bundle's). ``overlay``: the version's own file (None: no overlay store,
    posts are refused); ``root``: the serve cache root, where the model's other versions' files are
    found (:attr:`files`).
    Mutations are serialised by an internal lock; the retriever's segment swap keeps searches safe."""

    def __init__(self, retriever: Any, overlay: ItemOverlay | None, root: Path | None = None,
                 model: str | None = None) -> None:
        self.retriever = retriever
        self.embedder = getattr(retriever, "item_embedder", None) if hasattr(retriever, "add_items") else None
        self.overlay = overlay
        self.root = root
        self.model = model or "the served model"
        self._offsets: dict[Path, int] = {}  # per file: the byte after the last line applied
        self._stats: dict[Path, tuple[int, int] | None] = {}  # per file: (size, mtime) when last read
        self.skipped = 0  # overlay records this version could not apply
        self._lock = threading.Lock()

    @classmethod
    def open(cls, retriever: Any, info: dict[str, Any], root: Path | None) -> PostedItems:
        """The posted items of a freshly loaded version (``info``: the loader's, with ``name`` and
        ``version``; ``root``: the serve cache root, None for no overlay store), overlays applied."""
        bundle = getattr(retriever, "bundle", None)
        meta = getattr(bundle, "meta", None) or {}
        name = info.get("name") or meta.get("model")
        version = info.get("version") or meta.get("run_id")
        label = f"{meta.get('model') or 'the model'} ({name} v{version})" if name else str(meta.get("model"))
        if root is None or not name or version is None:
            return cls(retriever, None, model=label)
        items = cls(retriever, ItemOverlay(root, str(name), str(version)), Path(root), model=label)
        items.load()
        return items

    @property
    def can_post(self) -> bool:
        return self.embedder is not None and self.overlay is not None

    @property
    def files(self) -> list[ItemOverlay]:
        """The overlays this version applies: the model's other versions' (listed afresh: one may
        appear while this version serves, during a rollover), then its own."""
        own = self.overlay
        if own is None or self.root is None:
            return []
        return [*(o for o in model_overlays(self.root, own.model_name) if o.path != own.path), own]

    def describe(self) -> dict[str, Any]:
        """``/v1/model``'s ``posted_items``."""
        out: dict[str, Any] = {"count": int(getattr(self.retriever, "n_posted", 0)), "accepts": self.can_post}
        if self.embedder is not None:
            out["embedding"] = self.embedder.describe()
        if self.skipped:
            out["not_applied"] = self.skipped
        return out

    # ------------------------------------------------------------------ applying overlays
    def load(self) -> int:
        """Apply every overlay of the model (at load time): the other versions', then the own."""
        applied = self.catch_up()
        if applied:
            log.info("applied %d posted items to %s", applied, self.model)
        return applied

    def changed(self) -> bool:
        """Cheap: has one of the overlays changed since it was last read (one ``stat`` each)? The
        other versions' count too: during a rollover a worker still on the old version may post."""
        return any(f.stat() != self._stats.get(f.path) for f in self.files)

    def catch_up(self) -> int:
        """Apply what was appended to the overlays since the last read (other workers' posts)."""
        with self._lock:
            return self._catch_up_locked()

    def _catch_up_locked(self) -> int:
        applied = 0
        for overlay in self.files:
            stat = overlay.stat()  # before the read: a line appended meanwhile shows as a change next time
            records, self._offsets[overlay.path] = overlay.read_from(self._offsets.get(overlay.path, 0))
            self._stats[overlay.path] = stat
            applied += self._apply(records)
        return applied

    def _apply(self, records: list[dict[str, Any]]) -> int:
        if not records:
            return 0
        has_item = getattr(self.retriever, "has_item", None)
        if self.embedder is None or has_item is None:
            bundle = getattr(self.retriever, "bundle", None)
            known = set(bundle.items["item_id"].to_list()) if bundle is not None else set()
            missing = [r for r in records if r["item_id"] not in known]
            if missing:
                self.skipped += len(missing)
                log.warning("%s cannot embed new items: %d posted items are not served by it", self.model,
                            len(missing))
            return 0
        # known ids: the catalogue has them (a version trained on the overlay), or they were applied already
        fresh = [r for r in records if not has_item(r["item_id"])]
        if not fresh:
            return 0
        ids, names, resolved = [], [], []
        taken: set[str] = set()
        for record in fresh:
            item = as_overlay_item(record)
            if item is None or item.item_id in taken:
                continue
            try:
                facts = self.embedder.resolve(item.facts)
            except FactError as exc:
                self.skipped += 1
                log.warning("posted item %s cannot be applied to %s: %s", quote_input(item.item_id, 80), self.model,
                            exc.message)
                continue
            taken.add(item.item_id)
            ids.append(item.item_id)
            names.append(item.name)
            resolved.append(facts)
        if not ids:
            return 0
        self.retriever.add_items(ids, names, self.embedder.embed(resolved))
        return len(ids)

    # ------------------------------------------------------------------ posting
    def post(self, item_id: str, facts: Sequence[tuple[str, str]], name: str | None) -> PostResult:
        """Validate, embed, append durably and add one item (module docstring); raises a
        :class:`~kgrec.serving.errors.CandidateError` (409 duplicate or cannot post, 422 bad fact)."""
        if self.embedder is None:
            raise CannotPostItemsError(
                f"{self.model} cannot embed new items: only KGAT bundles carry the inductive item embedding "
                "(serve a KGAT version to post items)")
        if self.overlay is None:
            raise CannotPostItemsError("this service has no overlay store for posted items (serve a registered "
                                       "version through the serve cache)")
        resolved = self.embedder.resolve(facts)
        with self._lock:
            self._refuse_duplicate(item_id)
            with self.overlay.locked():
                self._catch_up_locked()  # other workers' lines decide duplicates too
                self._refuse_duplicate(item_id)
                vector = self.embedder.embed([resolved])
                record = {
                    "item_id": item_id,
                    "name": name,
                    "facts": [{"relation": r, "entity": e} for r, e in dict.fromkeys(facts)],
                    "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                    "model": self.overlay.model_name,
                    "version": self.overlay.version,
                }
                end = self.overlay.append(record)
                (position,) = self.retriever.add_items([item_id], [name], vector)
                self._offsets[self.overlay.path], self._stats[self.overlay.path] = end, self.overlay.stat()
        return PostResult(item_id, position, int(self.retriever.n_items), len(resolved), self.embedder.describe())

    def _refuse_duplicate(self, item_id: str) -> None:
        if self.retriever.has_item(item_id):
            where = "in the catalogue" if self.retriever.in_catalogue(item_id) else "posted already"
            raise DuplicateItemError(f"item {quote_input(item_id, 80)} is {where}")
