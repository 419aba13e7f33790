"""What the service serves, and how it changes without a restart (:class:`ServingState`).

A loaded model is one immutable :class:`Served` snapshot (retriever, optional two-stage ranker,
their info). A request takes the snapshot once and uses only it, so a swap in the middle of a
request cannot mix two versions: the answer's ``model.version`` is the version that answered.

Loaders are callables returning ``(service, info)``. One that also has ``probe() -> version``
(e.g. :class:`~kgrec.serving.champion.RegisteredModel`) can be watched: :meth:`ServingState.reload`
asks every loader which version it would load now and, when that differs from what is served,
loads the new one in the calling (background) thread, verifies it (:func:`verify_served`: the
loaders check manifests and dimensions, this runs a smoke query) and swaps the snapshot in one
assignment. A version that fails to load or verify leaves the old one serving; the failure is kept
in :attr:`ServingState.reload_status` (``/v1/model``) and counted in the metrics, and that version
is retried by polling only after a back-off (5 s, doubling per repeated failure, at most 10 min;
an explicit ``POST /admin/reload`` retries it at once).

Posted items (``POST /v1/items``, :mod:`kgrec.serving.overlay`): each :class:`Served` carries its
:class:`~kgrec.serving.overlay.PostedItems`, which applied the model's overlays when the version was
built. A post and a swap exclude each other (``overlay_lock``): a post appends to the overlay and
adds the item to the current snapshot while holding it, and a load or reload, holding it, first
catches the new snapshot up with the overlay (what was posted while it was being built) and then
swaps it in. So an item answered 201 is in whatever snapshot serves afterwards.
"""

from __future__ import annotations

import gc
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from kgrec.serving.errors import ServiceUnavailable
from kgrec.serving.metrics import ServiceMetrics
from kgrec.serving.overlay import CannotPostItemsError, PostedItems, PostResult
from kgrec.serving.protocols import Ranker, Retriever
from kgrec.serving.ranking import TwoStageService

if TYPE_CHECKING:
    from kgrec.serving.ranking import RankerBundle

log = logging.getLogger("kgrec.serving")

Loader = Callable[[], "tuple[Retriever, dict[str, Any]]"]
RankerLoader = Callable[[], "tuple[RankerBundle, dict[str, Any]] | None"]
Versions = tuple[str | None, str | None]  # (retriever, ranker)
FIRST_RETRY_DELAY_S = 5.0
MAX_RETRY_DELAY_S = 600.0

# An absolute path in a message (not the path part of a URL): the client sees its last part only.
_ABSOLUTE_PATH = re.compile(r"(?<![\w:/.~-])/(?:[^\s'\",;:()\[\]]+/)+([^\s'\",;:()\[\]/]*)")


def public_message(text: str, limit: int = 500) -> str:
    """``text`` fit for a client: absolute filesystem paths cut to their last part, at most ``limit``
    characters."""
    text = _ABSOLUTE_PATH.sub(lambda m: f".../{m.group(1)}", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def summary(info: dict[str, Any]) -> dict[str, Any]:
    """``{"name", "version"}`` of a loader's info."""
    return {"name": info.get("name", info.get("registered_name")), "version": info.get("version")}


def _version(info: dict[str, Any] | None) -> str | None:
    version = (info or {}).get("version")
    return None if version is None else str(version)


@dataclass(frozen=True, slots=True)
class Served:
    """One loaded model (and ranker), never mutated after construction."""

    retriever: Retriever
    two_stage: TwoStageService | None
    info: dict[str, Any]  # /readyz and /v1/model
    summary: dict[str, Any]  # {"name", "version"} of the retriever
    ranker_summary: dict[str, Any]
    versions: Versions
    items: PostedItems | None = None  # posted items of this version (None: a retriever without a bundle)


def verify_served(served: Served) -> None:
    """A smoke query through what was loaded: a known user's top-k (and its re-ranking) comes back
    non-empty with finite scores, and a one-item history answers. Raises ``ValueError``."""
    retriever = served.retriever
    if retriever.n_items < 2:
        raise ValueError(f"the model has {retriever.n_items} items")
    bundle = getattr(retriever, "bundle", None)
    if bundle is None:  # a retriever without a bundle (tests' fakes): nothing more to check
        return
    user_id = str(bundle.users["user_id"][0])
    item_id = str(bundle.items["item_id"][0])
    k = min(10, retriever.n_items - 1)
    for label, result in (
        (f"user {user_id!r}", retriever.for_user(user_id, k)),
        (f"history [{item_id!r}]", retriever.for_history([item_id], k)),
    ):
        finite = bool(np.isfinite(np.asarray(result.scores, dtype=np.float64)).all())
        if len(result) == 0 or not finite:
            raise ValueError(f"smoke query for {label} gave {len(result)} candidates, finite scores: {finite}")
    if served.two_stage is not None and served.two_stage.knows_user(user_id):
        ranked = served.two_stage.for_user(user_id, k=min(5, served.two_stage.ranker.num_candidates))
        if not ranked.item_ids:
            raise ValueError(f"smoke re-ranking for user {user_id!r} gave no candidates")


class ServingState:
    """The current :class:`Served` snapshot (``None`` until a load succeeds) and its reloads."""

    def __init__(self, load_service: Loader, load_ranker: RankerLoader | None = None,
                 metrics: ServiceMetrics | None = None, torch_threads: int | None = 1,
                 overlay_root: Path | None = None, max_item_facts: int = 256, fresh_slots: int = 0) -> None:
        self.load_service = load_service
        #: the serve cache root the posted items' overlays live under (None: posts are refused)
        self.overlay_root = overlay_root
        self.max_item_facts = int(max_item_facts)
        #: candidate slots reserved for posted items when a request does not set ``fresh``
        self.fresh_slots = int(fresh_slots)
        #: held by a post (append + add) and by a swap (catch-up + assignment): module docstring
        self.overlay_lock = threading.Lock()
        self.load_ranker = load_ranker
        self.metrics = metrics or ServiceMetrics()
        self.torch_threads = torch_threads
        self.current: Served | None = None
        self.error: str | None = "model not loaded yet"
        self.reload_status: dict[str, Any] = {"successes": 0, "failures": 0, "last_error": None,
                                              "failed_versions": None, "last_checked": None}
        self._lock = threading.Lock()
        #: Polling retries a version that failed after this many seconds, doubling per repeat.
        self.retry_delay_s = FIRST_RETRY_DELAY_S
        self._retry_delay, self._retry_at = FIRST_RETRY_DELAY_S, 0.0

    # ------------------------------------------------------------------ reading
    def ready(self) -> Served:
        served = self.current
        if served is None:
            raise ServiceUnavailable(f"model not loaded: {self.error}")
        return served

    def model_info(self, served: Served) -> dict[str, Any]:
        live = {"n_items": served.retriever.n_items}
        if served.items is not None:
            live["posted_items"] = served.items.describe()
        return {**served.info, **live, "reload": dict(self.reload_status)}

    # ------------------------------------------------------------------ posted items
    def post_item(self, item_id: str, facts: Sequence[tuple[str, str]], name: str | None) -> tuple[Served, PostResult]:
        """Add a posted item to what serves now, durably (module docstring); blocking (file lock,
        fsync): call it from a thread. Raises a CandidateError (409, 422) or ServiceUnavailable."""
        with self.overlay_lock:
            served = self.ready()
            if served.items is None:
                raise CannotPostItemsError(f"the served retriever ({type(served.retriever).__name__}) cannot "
                                           "take posted items")
            return served, served.items.post(item_id, facts, name)

    def sync_posted(self) -> int:
        """Apply the items other workers appended to the served version's overlay; returns how many."""
        served = self.current
        if served is None or served.items is None or not served.items.changed():
            return 0
        return served.items.catch_up()

    # ------------------------------------------------------------------ loading
    def build(self) -> Served:
        """Run the loaders and verify the result (raises on any failure; nothing is swapped)."""
        retriever, info = self.load_service()
        if not isinstance(retriever, Retriever):
            raise TypeError(
                f"loader returned {type(retriever).__name__}, expected a Retriever "
                "(CandidateService or MultiInterestService)"
            )
        full = {
            **dict(info or {}),
            **retriever.info(),
            "index_kind": retriever.index_kind,
            "n_items": retriever.n_items,
            "n_users": retriever.n_users,
        }
        two_stage, ranker_info, ranker_summary = None, None, {}
        ranker = self.load_ranker() if self.load_ranker is not None else None
        if ranker is not None:
            bundle, ranker_info = ranker
            if not isinstance(bundle.model, Ranker):
                raise TypeError(f"ranker bundle holds {type(bundle.model).__name__}, expected a Ranker")
            two_stage = TwoStageService(retriever, bundle, torch_threads=self.torch_threads)
            full["ranker"] = {**dict(ranker_info or {}), **two_stage.info()}
            ranker_summary = summary(full["ranker"])
        items = PostedItems.open(retriever, dict(info or {}), self.overlay_root) if hasattr(retriever, "bundle") else None
        served = Served(retriever, two_stage, full, summary(full), ranker_summary,
                        (_version(info), _version(ranker_info)), items)
        verify_served(served)
        return served

    def _catch_up_and_swap(self, served: Served) -> None:
        with self.overlay_lock:  # nothing posted between the build's overlay read and the swap is lost
            if served.items is not None:
                served.items.catch_up()
            self._swap(served)

    def load(self) -> bool:
        """The first load (at startup); on failure the state stays unready with the error."""
        with self._lock:
            t0 = time.perf_counter()
            try:
                served = self.build()
            except Exception as exc:  # keep serving /healthz and report on /readyz
                self.error = public_message(f"{type(exc).__name__}: {exc}")
                log.error("model load failed: %s: %s", type(exc).__name__, exc)
                log.debug("model load failed", exc_info=True)
                self.metrics.ready.set(0)
                return False
            self._catch_up_and_swap(served)
            log.info("model loaded in %.2fs: %s", time.perf_counter() - t0, served.summary)
            return True

    def wanted_versions(self) -> Versions | None:
        """What the loaders would load now (``None`` when a loader cannot tell: not watchable)."""
        probes = [getattr(loader, "probe", None) for loader in (self.load_service, self.load_ranker)]
        if probes[0] is None:
            return None
        return (probes[0](), probes[1]() if probes[1] is not None else None)

    def reload(self, force: bool = False, trigger: str = "poll") -> dict[str, Any]:
        """Load the version the loaders name now if it differs from the served one (or ``force``),
        verify it and swap. Returns ``{"status": "reloaded" | "unchanged" | "failed", ...}``; never
        raises. Runs in a background thread (the event loop keeps answering)."""
        with self._lock:
            t0 = time.perf_counter()
            before = self.current
            self.reload_status["last_checked"] = round(time.time(), 3)
            try:
                wanted = self.wanted_versions()
            except Exception as exc:  # registry unreachable, alias removed, ...
                return self._failed(None, exc, trigger)
            if not force and wanted is not None:
                if before is not None and wanted == before.versions:
                    return {"status": "unchanged", "model": before.summary}
                if wanted == self.reload_status["failed_versions"] and time.monotonic() < self._retry_at:
                    return {"status": "unchanged", "model": before.summary if before else None,
                            "detail": f"version {wanted[0]} failed before: {self.reload_status['last_error']}"}
            if wanted is None and not force and before is not None:
                return {"status": "unchanged", "model": before.summary}
            try:
                served = self.build()
            except Exception as exc:
                return self._failed(wanted, exc, trigger)
            self._catch_up_and_swap(served)
            self.reload_status["successes"] += 1
            self.reload_status["failed_versions"] = None
            self.metrics.reloads.labels("success").inc()
            took = round(time.perf_counter() - t0, 3)
            log.info("reloaded (%s) in %.2fs: %s -> %s", trigger, took,
                     before.summary if before else None, served.summary)
            return {"status": "reloaded", "model": served.summary,
                    "previous": before.summary if before else None, "seconds": took}

    def _failed(self, wanted: Versions | None, exc: BaseException, trigger: str) -> dict[str, Any]:
        message = public_message(f"{type(exc).__name__}: {exc}")
        log.warning("reload (%s) failed, still serving %s: %s", trigger,
                    self.current.summary if self.current else None, message)
        # The same version failing again waits twice as long before polling retries it (a damaged
        # artefact is not downloaded every interval; a transient error does not block it for good).
        repeated = wanted is not None and wanted == self.reload_status["failed_versions"]
        self._retry_delay = min(MAX_RETRY_DELAY_S, self._retry_delay * 2) if repeated else self.retry_delay_s
        self._retry_at = time.monotonic() + self._retry_delay
        self.reload_status.update(failures=self.reload_status["failures"] + 1, last_error=message,
                                  failed_versions=wanted, last_failure=round(time.time(), 3),
                                  retry_in_s=round(self._retry_delay, 1))
        self.metrics.reloads.labels("failure").inc()
        self.metrics.last_reload_failure.set(time.time())
        if self.current is None:
            self.error = message
        return {"status": "failed", "model": self.current.summary if self.current else None, "detail": message}

    def _swap(self, served: Served) -> None:
        previous = self.current
        self.current, self.error = served, None  # one assignment: requests see old or new, whole
        self.metrics.set_served("retriever", served.info)
        self.metrics.set_served("ranker", served.info.get("ranker"))
        self.metrics.ready.set(1)
        before = previous.versions if previous is not None else (None, None)
        for loader, at in ((self.load_service, 0), (self.load_ranker, 1)):
            retain = getattr(loader, "retain", None)
            if retain is not None:  # the serve cache keeps the served and the previous version
                retain({v for v in (served.versions[at], before[at]) if v})
        del previous
        # The model is long-lived: move it out of the collector's generations so that full
        # collections do not show in the latency tail. The old snapshot is freed by refcount; no
        # gc.unfreeze() + collect() here: a full collection of the heap holds the GIL for ~0.5 s,
        # and the event loop would answer nothing meanwhile.
        gc.freeze()

    def unload(self) -> None:
        self.current = None
        self.metrics.ready.set(0)
