"""Two-stage serving: the retrieval champion's top-N re-ranked by the ranking champion (KCAN).

Ranker bundle directory (written atomically, like the retrieval bundle)::

    kcan.pt, kcan.json   the KCAN artefact (:meth:`kgrec.models.rankers.kcan.KCAN.save`)
    users.parquet        user_id: str, user_idx: int     (the ranker's own id maps: the retriever
    items.parquet        item_id: str, item_idx: int      may have been trained on other indices)
    meta.json            kind "ranker", model, dataset, snapshot_hash, alpha, num_candidates, ...
    MANIFEST.json        checksums of every file (:class:`kgrec.serving.bundle.Bundle`)

:class:`TwoStageService` answers ``for_user(user_id, k, n)``: retrieve ``n`` unseen candidates with
the retrieval service, score all ``n`` pairs with one batched KCAN forward, order them by the fused
score :math:`(1-\\alpha) z(s_{ret}) + \\alpha z(s_{KCAN})` (per-request z-scores, ``alpha`` chosen on
validation when the ranker was trained, see :mod:`kgrec.models.reranking`) and return the top ``k``
with both scores. Candidates the ranker does not know (an item newer than its snapshot) keep their
place after every scored candidate. Each request's stage times are returned; the service records
them in its Prometheus histograms (:mod:`kgrec.serving.metrics`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from kgrec.models.rankers.kcan import KCAN
from kgrec.models.reranking import fuse
from kgrec.models.tracking.registry import RANKER_KIND
from kgrec.serving.bundle import Bundle, BundleError, id_lookup
from kgrec.serving.candidates import CandidateError, InvalidRequestError, quote_input

RANKER_FILES = ("kcan.pt", "kcan.json", "users.parquet", "items.parquet", "meta.json")
MAX_CANDIDATES = 1000


class UnknownRankerUserError(CandidateError):
    """The retriever knows the user but the ranker does not (trained on another snapshot)."""

    status_code = 404

    def __init__(self, user_id: str):
        super().__init__(f"user {quote_input(user_id)} is unknown to the ranking model")


@dataclass
class RankerBundle(Bundle):
    kind = RANKER_KIND
    payload_files = ("kcan.pt", "kcan.json")

    model: KCAN
    users: pl.DataFrame
    items: pl.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._setup()

    @classmethod
    def _item_columns(cls, items: pl.DataFrame) -> list[pl.Expr]:
        return []  # the ranker's id maps are ids only

    @property
    def n_users(self) -> int:
        return int(self.model.num_users)

    @property
    def n_items(self) -> int:
        return int(self.model.num_items)

    def validate(self) -> None:
        if self.users.height != self.model.num_users or self.items.height != self.model.num_items:
            raise BundleError(
                f"id maps cover {self.users.height} users x {self.items.height} items, the model "
                f"{self.model.num_users} x {self.model.num_items}"
            )
        super().validate()

    @property
    def alpha(self) -> float:
        return float(self.meta.get("alpha", 1.0))

    @property
    def num_candidates(self) -> int:
        return int(self.meta.get("num_candidates", 200))

    def _write_payload(self, directory: Path) -> None:
        self.model.save(directory, extra={"alpha": self.alpha, "num_candidates": self.num_candidates})

    @classmethod
    def _read_payload(
        cls, directory: Path, meta: dict[str, Any], users: pl.DataFrame, items: pl.DataFrame
    ) -> RankerBundle:
        return cls(KCAN.load(directory), users, items, meta)


@dataclass(slots=True)
class RankedResult:
    user_id: str
    item_ids: list[str]
    names: list[str | None]
    scores: np.ndarray  # fused, non-increasing
    retrieval_scores: np.ndarray
    ranking_scores: np.ndarray  # KCAN's raw score; NaN where the ranker does not know the item
    retrieval_ranks: np.ndarray  # 1-based position in the retrieval list
    num_candidates: int
    timings_ms: dict[str, float]

    def records(self) -> list[dict[str, Any]]:
        return [
            {
                "item_id": iid,
                "name": name,
                "score": s,
                "retrieval_score": rs,
                "ranking_score": None if ks != ks else ks,  # NaN -> null
                "retrieval_rank": r,
            }
            for iid, name, s, rs, ks, r in zip(
                self.item_ids, self.names, self.scores.tolist(), self.retrieval_scores.tolist(),
                self.ranking_scores.tolist(), self.retrieval_ranks.tolist(),
            )
        ]


class TwoStageService:
    """Retrieve with ``retrieval`` (a candidate service), re-rank with ``ranker``."""

    STAGES = ("retrieval", "ranking", "total")

    def __init__(self, retrieval: Any, ranker: RankerBundle, torch_threads: int | None = 1):
        self.retrieval = retrieval
        self.ranker = ranker
        self.model = ranker.model.eval()
        self.torch_threads = torch_threads
        self._user_index = id_lookup(ranker.users, "user_id", "user_idx")
        self._item_index = id_lookup(ranker.items, "item_id", "item_idx")
        if torch_threads is not None:  # before the warm-up: it would start a pool of all cores
            torch.set_num_threads(torch_threads)
        self._warm_up()

    def _warm_up(self) -> None:
        """Build KCAN's cached global representations and subgraph table before the first request."""
        with torch.inference_mode():
            self.model.score_pairs(torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))

    def knows_user(self, user_id: str) -> bool:
        return user_id in self._user_index

    def info(self) -> dict[str, Any]:
        meta = self.ranker.meta
        return {
            "model": meta.get("model"),
            "dataset": meta.get("dataset"),
            "alpha": self.ranker.alpha,
            "default_num_candidates": self.ranker.num_candidates,
            "trained_with_retriever": meta.get("retriever"),
        }

    def for_user(self, user_id: str, k: int = 20, n: int | None = None) -> RankedResult:
        n = self.ranker.num_candidates if n is None else int(n)
        if not 1 <= n <= MAX_CANDIDATES:
            raise InvalidRequestError(f"n must be between 1 and {MAX_CANDIDATES}, got {n}")
        if not 1 <= k <= n:
            raise InvalidRequestError(f"k must be between 1 and n={n}, got {k}")
        if self.torch_threads is not None and torch.get_num_threads() != self.torch_threads:
            torch.set_num_threads(self.torch_threads)  # per OS thread: callers may use several
        t0 = time.perf_counter()
        retrieved = self.retrieval.for_user(user_id, n)
        t1 = time.perf_counter()
        user_idx = self._user_index.get(user_id)
        if user_idx is None:
            raise UnknownRankerUserError(user_id)
        lookup = self._item_index
        item_idx = np.fromiter((lookup.get(i, -1) for i in retrieved.item_ids), np.int64, len(retrieved))
        known = item_idx >= 0
        ranking = np.full(len(retrieved), np.nan, dtype=np.float32)
        if known.any():
            items = torch.from_numpy(item_idx[known])
            with torch.inference_mode():
                scored = self.model.score_pairs(torch.full_like(items, user_idx), items)
            ranking[known] = scored.float().numpy()
        retrieval_scores = np.asarray(retrieved.scores, dtype=np.float32)
        kcan = torch.from_numpy(np.where(known, ranking, -np.inf).astype(np.float32))
        fused = fuse(torch.from_numpy(retrieval_scores)[None], kcan[None], self.ranker.alpha)[0].numpy()
        fused = np.where(known, fused, -np.inf)
        order = np.argsort(-fused, kind="stable")[:k]
        t2 = time.perf_counter()
        timings = {
            "retrieval": round((t1 - t0) * 1e3, 3),
            "ranking": round((t2 - t1) * 1e3, 3),
            "total": round((t2 - t0) * 1e3, 3),
        }
        ids, names = retrieved.item_ids, retrieved.names
        return RankedResult(
            user_id=user_id,
            item_ids=[ids[i] for i in order],
            names=[names[i] for i in order],
            scores=np.where(np.isfinite(fused[order]), fused[order], np.nan).astype(np.float32),
            retrieval_scores=retrieval_scores[order],
            ranking_scores=ranking[order],
            retrieval_ranks=order + 1,
            num_candidates=len(retrieved),
            timings_ms=timings,
        )
