"""What the HTTP layer needs from a retriever and from a ranking model, as structural types.

The service (:mod:`kgrec.serving.service`) is written against these protocols, not against the
concrete classes, so a new retriever only has to provide the members below. Both protocols are
``runtime_checkable``: the app checks what a loader returns once, at startup, and then calls the
members without ``hasattr`` probing. (A runtime check only sees that the members exist, not their
signatures; the signatures are for the type checker.)

Implementations: :class:`~kgrec.serving.candidates.CandidateService` (embedding retriever,
``supports_merge = False``) and :class:`~kgrec.serving.multi_interest.MultiInterestService`
(multi-interest retriever, ``supports_merge = True``) are retrievers; the KCAN model of a
:class:`~kgrec.serving.ranking.RankerBundle` is a ranker.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, Self, runtime_checkable

if TYPE_CHECKING:
    from kgrec.serving.candidates import CandidateResult
    from torch import Tensor


@runtime_checkable
class Retriever(Protocol):
    """Top-k candidates from a faiss index, for a known user or for a raw item history.

    The methods below are the signature every retriever accepts. A retriever whose
    ``supports_merge`` is true also accepts the keyword arguments ``merge`` (a merge rule name)
    and ``diversity`` (the controllable merge's lambda) on ``for_user``, ``for_history`` and
    ``for_users``; callers pass them only to such a retriever. Request errors are raised as
    :class:`~kgrec.serving.candidates.CandidateError` subclasses (they carry the HTTP status).
    """

    @property
    def supports_merge(self) -> bool:
        """Whether ``merge`` / ``diversity`` are accepted (multi-interest retrievers)."""
        ...

    @property
    def n_items(self) -> int: ...

    @property
    def n_users(self) -> int: ...

    @property
    def index_kind(self) -> str:
        """The faiss index type searched (``flat``, ``hnsw``, ...)."""
        ...

    def info(self) -> dict[str, Any]:
        """JSON description of the retriever (at least ``kind``), merged into the model info."""
        ...

    def for_user(self, user_id: str, k: int = 100) -> CandidateResult:
        """Top-``k`` unseen items for a known user (raw id); unknown users raise a 404 error."""
        ...

    def for_history(self, item_ids: Iterable[str | int], k: int = 100) -> CandidateResult:
        """Top-``k`` items for an ordered raw item history (oldest first), history excluded."""
        ...

    def for_users(self, user_ids: Sequence[str], k: int = 20) -> Sequence[CandidateResult | None]:
        """``for_user`` over many users; ``None`` for an unknown user."""
        ...

    def explain(self, user_id: str, item_id: str, max_paths: int = 5) -> dict[str, Any]:
        """Attention paths user -> item (raises a 404 error where the model cannot explain)."""
        ...


@runtime_checkable
class Ranker(Protocol):
    """A second-stage model that scores (user, item) pairs, as
    :class:`~kgrec.serving.ranking.TwoStageService` uses it: put into inference mode once,
    then one batched call per request."""

    def eval(self) -> Self:
        """Switch to inference mode (no dropout); returns the model itself."""
        ...

    def score_pairs(self, users: Tensor, items: Tensor) -> Tensor:
        """Scores ``[B]`` (higher is better) of the pairs ``(users[b], items[b])``: int64 tensors of
        the ranker's own user and item indices."""
        ...
