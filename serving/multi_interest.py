"""Serving a multi-interest candidate generator: its bundle and :class:`MultiInterestService`.

Multi-interest bundle (a directory; ``meta.json`` ``kind = "multi_interest"``)::

    model/                save_model output: model.json (class, hparams, merge rule), model.pt
                          (bundles written before kgrec.models.persistence: state.pt)
    item_embeddings.npy   float32 [I, d] (what the faiss index is built on; = model.item_embeddings())
    items.parquet         item_id: str, item_idx: int32, name: str|null, categories: list[str]
    users.parquet         user_id: str, user_idx: int32   (the users with a stored history)
    histories.npz         CSR-style ``indptr`` int64 [U+1], ``items`` int32: row ``user_idx`` is the
                          user's FULL time-ordered history (oldest first; ties broken as in the split)
    meta.json             kind, model, dataset, snapshot_hash, num_interests, merge_rule, max_length,
                          dim, n_items, n_users, ...
    index/                optional faiss index (``kgrec.serving.index``)
    MANIFEST.json         checksums of every file (:class:`kgrec.serving.bundle.Bundle`)

:class:`MultiInterestService` has the methods the HTTP layer uses on a
:class:`~kgrec.serving.candidates.CandidateService` (``for_user``, ``for_history``, ``for_users``,
``explain``, ``n_items``, ``n_users``, ``index_kind``, ``has_user``, ``seen_items``), plus a
``merge`` argument. One request:

1. the history -- the posted ORDERED item ids, or a known user's stored history -- is mapped to
   ``item_idx``; its last ``L = max_length`` items go through the model once (torch, no autograd):
   ``K`` interest vectors, the active-interest mask and the interest weights;
2. every active interest queries the faiss index for ``k + |history|`` items (so that each list
   still holds ``k`` items after the history is removed);
3. the lists are merged by :func:`kgrec.models.sequential.multi_interest.merge_for_model` with the model's
   documented rule (``max``: max inner product + de-duplication; ``mixture`` for a model trained
   with the mixture readout) or the one the request asks for (``weighted``: weighted round-robin by
   interest weight; ``controllable``: ComiRec's diversity-aware greedy over item categories, with
   the model's :math:`\lambda` or the request's ``diversity``, choosing among the max merge's
   best ``4k``, so each interest then searches ``4k + |history|``), every history item excluded --
   the same function as offline
   evaluation (:func:`kgrec.models.sequential.multi_interest.recommend`);
4. if an approximate index returned too few usable items, the request is answered by an exact
   scan instead.

Every candidate carries ``interest``, the index of the interest it came from.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import polars as pl
import torch
from kgrec.models.merge import MERGE_RULES, pool_per_interest, search_interests
from kgrec.models.sequential.multi_interest import (
    MultiInterestModel,
    load_model,
    merge_for_model,
    pad_histories,
    save_model,
)
from kgrec.models.sequential_evaluation import category_matrix
from kgrec.serving.bundle import Bundle, BundleError, id_lookup
from kgrec.serving.candidates import (
    CandidateResult,
    ExplanationUnavailableError,
    InvalidRequestError,
    UnknownUserError,
    resolve_history,
)
from kgrec.serving.index import index_kind, index_over
from torch import Tensor

KIND = "multi_interest"
MODEL_DIRNAME = "model"
MI_BUNDLE_FILES = (  # required files (MANIFEST.json aside; the weights: model/model.pt or legacy state.pt)
    "model/model.json",
    "item_embeddings.npy",
    "items.parquet",
    "users.parquet",
    "histories.npz",
    "meta.json",
)
_MAX_INDEX_K = 4096


@dataclass
class MultiInterestBundle(Bundle):
    """The portable artefact of one trained multi-interest model (module docstring).

    ``histories[u]`` is user ``u``'s (``user_idx``) full time-ordered ``item_idx`` history.
    """

    kind = KIND
    payload_files = ("model/model.json", "item_embeddings.npy", "histories.npz")

    model: MultiInterestModel
    item_embeddings: np.ndarray
    items: pl.DataFrame
    users: pl.DataFrame
    histories: list[np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.item_embeddings = np.ascontiguousarray(self.item_embeddings, dtype=np.float32)
        self.histories = [np.asarray(h, dtype=np.int64) for h in self.histories]
        self._setup()
        self.meta.setdefault("num_interests", int(self.model.num_interests))
        self.meta.setdefault("merge_rule", self.model.merge_rule)
        self.meta.setdefault("max_length", int(self.model.max_length))

    @classmethod
    def from_model(
        cls,
        model: MultiInterestModel,
        items: pl.DataFrame,
        users: pl.DataFrame,
        histories: Sequence[np.ndarray],
        meta: dict[str, Any] | None = None,
    ) -> MultiInterestBundle:
        with torch.no_grad():
            item_emb = model.item_embeddings().detach().float().cpu().numpy()
        return cls(model.eval(), item_emb, items, users, list(histories), dict(meta or {}))

    # ------------------------------------------------------------------ properties
    @property
    def n_items(self) -> int:
        return int(self.item_embeddings.shape[0])

    @property
    def n_users(self) -> int:
        return len(self.histories)

    @property
    def dim(self) -> int:
        return int(self.item_embeddings.shape[1])

    @classmethod
    def _item_columns(cls, items: pl.DataFrame) -> list[pl.Expr]:
        return [
            *super()._item_columns(items),
            pl.col("categories").cast(pl.List(pl.Utf8))
            if "categories" in items.columns
            else pl.lit([], pl.List(pl.Utf8)).alias("categories")
        ]

    def _meta_counts(self) -> dict[str, int]:
        return {"dim": self.dim, **super()._meta_counts()}

    def validate(self) -> None:
        ie = self.item_embeddings
        if ie.ndim != 2:
            raise BundleError(f"item embeddings must be 2-D, got {ie.shape}")
        if ie.shape[0] != self.model.num_items:
            raise BundleError(f"item embeddings have {ie.shape[0]} rows, the model {self.model.num_items} items")
        super().validate()
        if self.histories:
            flat = np.concatenate(self.histories) if any(len(h) for h in self.histories) else np.zeros(0)
            if flat.size and (flat.min() < 0 or flat.max() >= ie.shape[0]):
                raise BundleError("histories hold item_idx outside [0, n_items)")

    def sample_queries(self, max_users: int = 1000, seed: int = 2020) -> np.ndarray:
        """Active interest vectors ``[N, d]`` of a seeded sample of the stored users' histories:
        what the service searches with (the index's recall check uses them)."""
        rng = np.random.default_rng(seed)
        users = np.arange(self.n_users)
        if users.size > max_users:
            users = np.sort(rng.choice(users, max_users, replace=False))
        histories = [self.histories[u] for u in users if len(self.histories[u])]
        if not histories:
            return self.item_embeddings[: min(self.n_items, max_users)]
        with torch.no_grad():
            h, n = pad_histories(histories, self.model.max_length)
            v, mask = self.model.eval().interests(h, n)
        return np.ascontiguousarray(v[mask].float().cpu().numpy())

    # ------------------------------------------------------------------ io
    def _write_payload(self, directory: Path) -> None:
        save_model(self.model, directory / MODEL_DIRNAME)
        np.save(directory / "item_embeddings.npy", self.item_embeddings)
        lengths = np.fromiter((len(h) for h in self.histories), dtype=np.int64, count=len(self.histories))
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        flat = np.concatenate(self.histories) if lengths.sum() else np.zeros(0, np.int64)
        np.savez_compressed(directory / "histories.npz", indptr=indptr, items=flat.astype(np.int32))

    @classmethod
    def _read_payload(
        cls, directory: Path, meta: dict[str, Any], users: pl.DataFrame, items: pl.DataFrame
    ) -> MultiInterestBundle:
        model = load_model(directory / MODEL_DIRNAME)
        item_emb = np.load(directory / "item_embeddings.npy", allow_pickle=False)
        with np.load(directory / "histories.npz", allow_pickle=False) as npz:
            indptr, flat = npz["indptr"].astype(np.int64), npz["items"].astype(np.int64)
        histories = np.split(flat, indptr[1:-1]) if len(indptr) > 1 else []
        return cls(model, item_emb, items, users, histories, meta)


@dataclass(slots=True)
class MultiInterestResult(CandidateResult):
    """A :class:`CandidateResult` whose candidates know their source interest."""

    interest: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # int64 [n]
    interest_weights: list[float] = field(default_factory=list)  # [K]; 0 = inactive interest
    merge: str = "max"
    diversity: float | None = None  # lambda of the controllable merge (None for the other rules)
    merge_ms: float = 0.0  # time spent merging the per-interest lists (a stage of the metrics)

    def records(self) -> list[dict[str, Any]]:
        """``[{"item_id", "score", "name", "interest"}]`` (the HTTP payload)."""
        return [
            {"item_id": iid, "score": s, "name": name, "interest": j}
            for iid, s, name, j in zip(self.item_ids, self.scores.tolist(), self.names, self.interest.tolist())
        ]

    def response_fields(self) -> dict[str, Any]:
        fields = {"merge": self.merge, "interest_weights": self.interest_weights}
        if self.diversity is not None:
            fields["diversity"] = self.diversity
        return fields


class MultiInterestService:
    """Candidates from a multi-interest model (module docstring); same interface as
    :class:`~kgrec.serving.candidates.CandidateService`, plus ``merge`` (a rule of
    :data:`~kgrec.models.merge.MERGE_RULES`, default: the model's) and ``diversity`` (the
    controllable rule's :math:`\lambda`, default: the model's)."""

    kind = KIND
    supports_merge = True

    def __init__(
        self,
        bundle: MultiInterestBundle,
        index: faiss.Index | None = None,
        search_threads: int = 1,
        torch_threads: int | None = None,
    ):
        self.bundle = bundle
        index = index_over(bundle.item_embeddings, index)
        if torch_threads is not None:
            torch.set_num_threads(int(torch_threads))
        self.index = index
        self.index_kind = index_kind(index)
        self.search_threads = int(search_threads)
        self._tls = threading.local()
        self.model = bundle.model.eval()
        self.merge_rule: str = bundle.meta.get("merge_rule") or self.model.merge_rule
        self.num_interests = int(self.model.num_interests)
        self.max_length = int(self.model.max_length)
        self._item_emb = bundle.item_embeddings
        self._histories = bundle.histories
        self._seen = [np.unique(h) for h in bundle.histories]
        users = bundle.users
        self._user_index = id_lookup(users, "user_id", "user_idx")
        items = bundle.items.sort("item_idx")
        self._item_ids: list[str] = items["item_id"].to_list()
        self._item_names: list[str | None] = items["name"].to_list()
        self._item_index: dict[str, int] = dict(zip(self._item_ids, range(len(self._item_ids))))
        category_lists = items["categories"].to_list()
        self._categories = category_matrix(category_lists)[0] if any(category_lists) else None
        if self.merge_rule == "controllable" and self._categories is None:
            raise BundleError("the model's merge rule is 'controllable' but its items have no categories")
        # warm-up: the first torch call of a process pays one-off dispatch costs
        self._interests(np.zeros(1, np.int64))

    # ------------------------------------------------------------------ introspection
    @property
    def n_items(self) -> int:
        return self.bundle.n_items

    @property
    def n_users(self) -> int:
        return self.bundle.n_users

    def has_user(self, user_id: str) -> bool:
        return user_id in self._user_index

    def history(self, user_id: str) -> np.ndarray:
        """A known user's stored, time-ordered ``item_idx`` history."""
        return self._histories[self._resolve_user(user_id)]

    def seen_items(self, user_id: str) -> np.ndarray:
        """Sorted unique ``item_idx`` of a known user's history (excluded from their candidates)."""
        return self._seen[self._resolve_user(user_id)]

    def info(self) -> dict[str, Any]:
        rules = [r for r in MERGE_RULES if r != "controllable" or self._categories is not None]
        return {"kind": KIND, "num_interests": self.num_interests, "merge_rule": self.merge_rule,
                "diversity_weight": self.model.diversity_weight, "max_length": self.max_length,
                "merge_rules": rules}

    # ------------------------------------------------------------------ public API
    def for_user(
        self, user_id: str, k: int = 100, merge: str | None = None, diversity: float | None = None
    ) -> MultiInterestResult:
        """Top-``k`` for a known user from their stored history (every history item excluded)."""
        k, (rule, lam) = self._check_k(k), self._check_merge(merge, diversity)
        u = self._resolve_user(user_id)
        return self._retrieve(self._histories[u], self._seen[u], k, rule, lam, user_id=str(user_id))

    def for_history(
        self, item_ids: Iterable[str | int], k: int = 100, merge: str | None = None,
        diversity: float | None = None,
    ) -> MultiInterestResult:
        """Top-``k`` for an ordered history of raw item ids (oldest first; the last ``max_length``
        known items feed the model). Unknown ids are reported and skipped; history items are excluded."""
        k, (rule, lam) = self._check_k(k), self._check_merge(merge, diversity)
        history, unknown = resolve_history(item_ids, self._item_index)
        return self._retrieve(
            history, np.unique(history), k, rule, lam, unknown_item_ids=list(dict.fromkeys(unknown))
        )

    def for_users(
        self, user_ids: Sequence[str], k: int = 20, merge: str | None = None, diversity: float | None = None
    ) -> list[MultiInterestResult | None]:
        """``for_user`` over many users; unknown users give ``None`` (used by the pyfunc model)."""
        k, (rule, lam) = self._check_k(k), self._check_merge(merge, diversity)
        out: list[MultiInterestResult | None] = []
        for user_id in (str(u) for u in user_ids):
            u = self._user_index.get(user_id)
            out.append(
                None if u is None
                else self._retrieve(self._histories[u], self._seen[u], k, rule, lam, user_id=user_id)
            )
        return out

    def explain(self, user_id: str, item_id: str, max_paths: int = 5) -> dict[str, Any]:
        raise ExplanationUnavailableError(
            f"the served model ({self.bundle.meta.get('model')}) is a multi-interest retriever without "
            "an attention graph to explain with; serve a KGAT model"
        )

    # ------------------------------------------------------------------ internals
    def _check_k(self, k: int) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise InvalidRequestError(f"k must be an integer, got {k!r}")
        k = int(k)
        if k < 1 or k > self.n_items:
            raise InvalidRequestError(f"k must be between 1 and the catalogue size {self.n_items}, got {k}")
        return k

    def _check_merge(self, merge: str | None, diversity: float | None = None) -> tuple[str, float | None]:
        """``(rule, lambda)``: lambda is None unless the rule is ``controllable``."""
        rule = self.merge_rule if merge is None else merge
        if rule not in MERGE_RULES:
            raise InvalidRequestError(f"unknown merge rule {rule!r}; choose from {list(MERGE_RULES)}")
        if rule != "controllable":
            if diversity is not None:
                raise InvalidRequestError(f"diversity applies to the controllable merge only, not {rule!r}")
            return rule, None
        if self._categories is None:
            raise InvalidRequestError("the controllable merge needs item categories; this model's items have none")
        if diversity is None:
            return rule, float(self.model.diversity_weight)
        if isinstance(diversity, bool) or not isinstance(diversity, (int, float)) or not 0 <= diversity < float("inf"):
            raise InvalidRequestError(f"diversity must be a finite number >= 0, got {diversity!r}")
        return rule, float(diversity)

    def _resolve_user(self, user_id: str) -> int:
        u = self._user_index.get(str(user_id))
        if u is None:
            raise UnknownUserError(str(user_id))
        return u

    def _ensure_threads(self, n: int) -> None:
        # OpenMP thread counts are per calling thread (see CandidateService._ensure_threads)
        if getattr(self._tls, "threads", None) != n:
            faiss.omp_set_num_threads(n)
            self._tls.threads = n

    def _interests(self, history: np.ndarray) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(histories [1, L], lengths [1], V [1, K, d], mask [1, K])`` of the last ``max_length``
        items of ``history``."""
        window = np.ascontiguousarray(history[-self.max_length :], dtype=np.int64)
        with torch.inference_mode():
            h = torch.from_numpy(window).unsqueeze(0)
            n = torch.tensor([window.shape[0]], dtype=torch.int64)
            v, mask = self.model.interests(h, n)
        return h, n, v, mask

    def _retrieve(
        self,
        history: np.ndarray,
        exclude: np.ndarray,
        k: int,
        rule: str,
        diversity: float | None = None,
        user_id: str | None = None,
        unknown_item_ids: list[str] | None = None,
    ) -> MultiInterestResult:
        h, n, v_t, mask_t = self._interests(history)
        v, mask = v_t[0].float().numpy(), mask_t[0].numpy()
        with torch.inference_mode():
            weights = self.model.interest_weights(h, n, mask_t)[0].double().numpy()
        weights = np.where(mask, np.maximum(weights, 0.0), 0.0)

        merge_seconds = 0.0

        def merge(ids: np.ndarray, sc: np.ndarray):
            nonlocal merge_seconds
            t0 = time.perf_counter()
            with torch.inference_mode():
                merged = merge_for_model(
                    self.model, h, n, v_t, mask_t, ids, sc, k, rule, [exclude], self._item_emb, weights[None],
                    categories=self._categories, diversity=diversity,
                )
            merge_seconds += time.perf_counter() - t0
            return merged

        n_items = self.n_items
        target = min(k, n_items - exclude.shape[0])
        per_interest = pool_per_interest(k, rule)
        n_search = min(n_items, per_interest + exclude.shape[0])
        items = scores = source = None
        active = np.flatnonzero(mask)
        if target <= 0 or active.size == 0:
            items, scores, source = np.empty(0, np.int64), np.empty(0, np.float32), np.empty(0, np.int64)
        elif n_search < n_items and n_search <= _MAX_INDEX_K:
            self._ensure_threads(self.search_threads)
            D, I = self.index.search(np.ascontiguousarray(v[active]), n_search)
            ids = np.full((1, self.num_interests, n_search), -1, np.int64)
            sc = np.full((1, self.num_interests, n_search), -np.inf, np.float32)
            ids[0, active], sc[0, active] = I, D
            items, scores, source = merge(ids, sc).row(0)
            if items.shape[0] < target:  # an approximate index came back short
                items = None
        if items is None:  # exact scan (also for searches as large as the catalogue)
            ids, sc = search_interests(
                v[None], self._item_emb, per_interest, exclude=[exclude], interest_mask=mask[None]
            )
            items, scores, source = merge(ids, sc).row(0)
        il = items.tolist()
        return MultiInterestResult(
            item_idx=items,
            scores=scores,
            item_ids=[self._item_ids[i] for i in il],
            names=[self._item_names[i] for i in il],
            user_id=user_id,
            unknown_item_ids=unknown_item_ids or [],
            interest=source,
            interest_weights=[round(float(w), 6) for w in weights],
            merge=rule,
            diversity=diversity,
            merge_ms=merge_seconds * 1e3,
        )
