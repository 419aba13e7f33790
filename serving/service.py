"""FastAPI candidates service.

``create_app(load_service, load_ranker=None, ...)`` builds the app; ``load_service()`` returns
``(service, model_info)``, the service being any :class:`~kgrec.serving.protocols.Retriever`: a
``CandidateService`` (embedding retriever) or a ``MultiInterestService`` (multi-interest retriever,
:mod:`kgrec.serving.multi_interest`). ``model_info`` is free-form JSON describing what is served; the
keys the pipeline uses are ``name`` (registered model name), ``version``, ``alias``, ``run_id``,
``model``, ``dataset``. ``kgrec serve`` builds it from :class:`~kgrec.serving.settings.ServeSettings`
(:func:`app_from_settings`; :func:`app_from_env` is the factory of ``--workers`` processes).

Loading and reloading (:mod:`kgrec.serving.state`): the first load runs in the lifespan; a loader that
raises leaves the process up (``/healthz`` 200, ``/readyz`` and the model endpoints 503 with the
reason) unless ``fail_fast``. A loader with ``probe()`` (the registry's, in ``kgrec serve``) is asked
every ``poll_interval_s`` which version the alias names; a new one is loaded in a background thread,
verified (manifests, dimensions, a smoke query) and swapped in atomically; one that fails leaves the
old version serving and is reported in ``/v1/model`` (``reload``) and in the metrics.
``POST /admin/reload`` does the same at once.

Endpoints::

    GET|HEAD /healthz                          liveness
    GET|HEAD /readyz                           200 + model info when loaded, else 503 + reason
    GET  /metrics                              Prometheus exposition (:mod:`kgrec.serving.metrics`)
    POST /admin/reload[?force=true]            bearer token; load what the alias names now
    GET  /v1/model                             model info (+ index kind, catalogue size, reload state)
    GET  /v1/users/{user_id}/candidates?k=100[&merge=max|weighted|mixture|controllable][&diversity=0.5]
                                         [&fresh=N]
                                               known user, seen items excluded; fresh: up to N of
                                               the k slots for posted items (kgrec.serving.candidates)
    GET  /v1/users/{user_id}/candidates/{item_id}/explain?max_paths=5
                                               top attention paths user -> item (KGAT models)
    POST /v1/candidates {"item_ids": [...], "k": 100, "merge": "max"|"weighted"|"mixture"|"controllable",
                         "diversity": 0.5, "fresh": 2}  (merge, diversity and fresh optional)
                                               unseen user from an ORDERED item history (oldest
                                               first; history excluded)
    GET  /v1/users/{user_id}/ranked?k=20&n=200 two-stage: the retriever's top n re-ranked by the
                                               ranking model; both scores and stage timings
    GET  /v1/latency                           per-stage p50/p90/p99 of this worker (a view of the
                                               Prometheus histograms)
    POST /v1/items {"item_id", "facts": [{"relation", "entity"}], "name"}
                                               bearer token; add an item after training: its vector
                                               from its KG facts (KGAT), into the live index and
                                               the overlay file (201; :mod:`kgrec.serving.overlay`)

The two-stage endpoints need ``load_ranker`` (``() -> (RankerBundle, info)`` or ``None`` for "no
ranker registered"); without a ranker they answer 503. A ranker that fails to load makes the whole
service unready: a deployment asked for two stages must not silently serve one.

Multi-interest retrievers compute the user's interests from the (last ``max_length`` items of the)
history, search the index once per interest and merge the lists (``merge``: the model's rule by
default; ``diversity`` is the controllable merge's lambda and a 422 with any other rule); every
candidate then carries ``interest`` (the index of the interest it came from) and the answer adds
``merge`` and ``interest_weights`` (and ``diversity`` for the controllable merge). Retrievers whose
``supports_merge`` is false (embedding retrievers) ignore ``merge`` and ``diversity``.

Errors are 4xx JSON, all declared in the OpenAPI schema: ``{"detail": "<message>"}`` for malformed
JSON 400, missing/wrong token 401, admin (or item posting) without a configured token 403, unknown
user or item 404, a posted item that exists already or a model that cannot embed new items 409,
body over ``max_body_bytes`` 413, model (or ranker) not loaded 503; a 422 (bad ``k`` / ``n`` /
``merge`` / body, an id over 256 characters, all posted items unknown, a posted fact with an
unknown relation or entity, no facts or too many) has FastAPI's shape
``{"detail": [{"loc", "msg", "type"}], "message": "<one line>"}``. Messages quote at most 200
characters of the input and no absolute path.

The edge (:mod:`kgrec.serving.middleware`, one pure ASGI middleware): request id (``X-Request-ID``,
echoed), body limit, metrics, one JSON access-log record per request. Security: ``token`` guards
``/admin/*``; ``require_token`` (``kgrec serve`` beyond loopback) guards everything but the health
probes; CORS is off unless ``cors_origins`` is given. ``POST /v1/items`` changes the catalogue for
good (its overlay is merged into the next training run), so it is guarded like ``/admin/*``: the
token always, loopback or not.

Structure: the endpoints live on module-level routers (``retrieval``, ``two_stage``, ``admin``,
``ops``, ``health``) that ``create_app`` includes, hot routes first (routes are matched in order).
What is served is one immutable :class:`~kgrec.serving.state.Served` snapshot in the
:class:`~kgrec.serving.state.ServingState` on ``app.state.kgrec``; a handler takes it once
(``state.ready()``, a 503 while none is loaded), so one answer never mixes two versions.

Latency: handlers AND dependencies are ``async def`` on purpose (FastAPI runs a plain ``def``
dependency in the threadpool too), and there is one flat dependency per handler. The retrieval itself
runs on the event loop: a threadpool hop costs ~70-85 us of CPU per call (measured around a
``for_user`` of ~80 us), as much as the work it would move. faiss and the BLAS are pinned to one
thread per worker (``threads_per_worker``; the ``--workers`` processes also get ``OMP_NUM_THREADS``,
``MKL_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``). Scale throughput with ``--workers`` (one per core;
each listens on its own ``SO_REUSEPORT`` socket, so the kernel spreads the connections). uvicorn runs
asyncio's loop (uvloop starved ~1 % of the answers under 64 connections a worker:
``ServeSettings.loop``) with httptools as its HTTP parser when it is installed.
The two candidates routes have a fast lane (:class:`FastLaneRoute`, "fast lane" below): a plainly
well-formed request skips FastAPI's per-request parameter machinery (~0.15-0.2 ms of CPU), anything
else -- every error answer included -- takes the full FastAPI path. Measured per-request CPU and
throughput against concurrency: ``benchmarks/serve_scale.py``.

Response bodies: every success body has a response type below (``TypedDict`` types, so they are in the
OpenAPI schema). The two candidates routes (the hot ones) build their answer as a dict in the declared
key order and serialise it once with orjson (:func:`candidates_json`), returned as a
:class:`JSONBytes` response: FastAPI neither validates nor re-encodes it (pydantic validation + dump
of a ``k=100`` answer ~90 us of CPU at 1M items, orjson ~30 us); ``response_model`` keeps the type in
the OpenAPI document, and tests/serving/test_service_scale.py checks that the bytes equal the declared
type's own validation and dump. The other handlers return plain dicts and declare the type as their
return annotation; FastAPI validates the dict against it and pydantic-core writes the JSON bytes in one
pass. ``TypedDict`` rather than ``BaseModel`` on purpose: validation yields dicts instead of ~100
model instances per candidate list, and a ``NotRequired`` key that the handler leaves out is simply
absent from the answer (``interest``, ``merge``, ``diversity``, ...), while a ``None`` it puts in stays
``null`` (``name``, ``ranking_score``), with no ``exclude_unset`` / ``exclude_none`` needed. Error bodies
(``{"detail": ...}``) are ``JSONResponse`` objects built by the exception handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import socket
import sys
import tempfile
import time
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal, NotRequired, Required, get_args

import faiss
import orjson
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from kgrec.models.tracking.settings import registered_ranker_name
from kgrec.serving.bundle import INDEX_DIRNAME
from kgrec.serving.cache import ServeCache
from kgrec.serving.candidates import QUOTE_LIMIT, CandidateError, InvalidRequestError
from kgrec.serving.champion import RegisteredModel, RegisteredRanker, open_service
from kgrec.serving.errors import ServiceUnavailable
from kgrec.serving.index import load_index
from kgrec.serving.metrics import MULTIPROC_ENV, ServiceMetrics
from kgrec.serving.middleware import RequestEdge, configure_logging, request_id_var
from kgrec.serving.protocols import Retriever
from kgrec.serving.ranking import TwoStageService
from kgrec.serving.settings import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_ITEM_FACTS,
    MAX_ID_LENGTH,
    SETTINGS_ENV,
    ServeSettings,
)
from kgrec.serving.state import Loader, RankerLoader, Served, ServingState, public_message
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, with_config
from starlette.exceptions import HTTPException
from starlette.types import Message, Receive, Scope, Send
from typing_extensions import TypedDict  # pydantic rejects typing.TypedDict on Python < 3.12

log = logging.getLogger(__name__)

MAX_K = 1000
MAX_HISTORY = 500

MergeParam = Literal["max", "weighted", "mixture", "controllable"]
#: Upper bound of the controllable merge's lambda in a request (beyond it the list is pure diversity).
MAX_DIVERSITY = 100.0


class HistoryRequest(BaseModel):
    """Body of ``POST /v1/candidates``: raw item ids (strings; integers are coerced) and ``k``."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    item_ids: list[Annotated[str, StringConstraints(max_length=MAX_ID_LENGTH)]] = Field(
        ..., min_length=1, max_length=MAX_HISTORY
    )
    k: int = Field(100, ge=1, le=MAX_K)
    merge: MergeParam | None = None  # multi-interest retrievers only (default: the model's rule)
    diversity: float | None = Field(None, ge=0.0, le=MAX_DIVERSITY)  # lambda of merge="controllable"
    fresh: int | None = Field(None, ge=0, le=MAX_K)  # slots reserved for posted items (default: the setting)


IdText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH)]
#: Longest display name of a posted item.
MAX_NAME_LENGTH = 1000


class ItemFact(BaseModel):
    """One KG fact of a posted item: a relation name of the served model's KG (the item is the
    triple's head; ``rev_<name>``: its tail) and an entity id of that KG (or an item's linked entity)."""

    model_config = ConfigDict(extra="forbid")

    relation: IdText
    entity: IdText


class NewItem(BaseModel):
    """Body of ``POST /v1/items``: the new item's raw id, its KG facts, an optional display name."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    item_id: IdText
    facts: list[ItemFact]  # 1 .. max_item_facts, checked by the handler (the limit is a setting)
    name: Annotated[str, StringConstraints(max_length=MAX_NAME_LENGTH)] | None = None


# ---------------------------------------------------------------------------- response bodies
# TypedDicts (module docstring, "Response bodies"): keys in answer order; NotRequired = absent unless
# the handler sets it.
class ModelSummary(TypedDict):
    """Which registered model answered (``name`` and ``version`` of the loader's info)."""

    name: str | None
    version: str | int | None


class Candidate(TypedDict):
    item_id: str
    score: float
    name: str | None
    interest: NotRequired[int]  # multi-interest retrievers: the interest the item came from


class UserCandidates(TypedDict):
    """``GET /v1/users/{user_id}/candidates``."""

    user_id: str
    k: int
    model: ModelSummary
    merge: NotRequired[str]  # multi-interest retrievers: the merge rule applied
    interest_weights: NotRequired[list[float]]  # multi-interest retrievers; 0 = inactive interest
    diversity: NotRequired[float]  # merge "controllable" only: its lambda
    candidates: list[Candidate]
    took_ms: float


class HistoryCandidates(TypedDict):
    """``POST /v1/candidates``."""

    k: int
    model: ModelSummary
    merge: NotRequired[str]
    interest_weights: NotRequired[list[float]]
    diversity: NotRequired[float]
    candidates: list[Candidate]
    unknown_item_ids: list[str]  # posted ids the model does not know (ignored)
    took_ms: float


class RankedCandidate(TypedDict):
    item_id: str
    name: str | None
    score: float | None  # fused; null where the ranker does not know the item (ranked last)
    retrieval_score: float
    ranking_score: float | None  # null where the ranker does not know the item
    retrieval_rank: int  # 1-based position in the retrieval list


class StageTimings(TypedDict):
    retrieval: float
    ranking: float
    total: float


class RankedCandidates(TypedDict):
    """``GET /v1/users/{user_id}/ranked``."""

    user_id: str
    k: int
    n: int  # candidates retrieved and re-ranked
    model: ModelSummary
    ranker: ModelSummary
    candidates: list[RankedCandidate]
    timings_ms: StageTimings


class StageStats(TypedDict, total=False):
    n: Required[int]  # samples in the window; the percentiles are absent while it is 0
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float


class TwoStageLatency(TypedDict):
    requests: int  # since startup
    retrieval: StageStats
    ranking: StageStats
    total: StageStats


class LatencyReport(TypedDict):
    """``GET /v1/latency``."""

    two_stage: TwoStageLatency


class GraphNode(TypedDict):
    type: str  # "item" | "entity" | "user"
    id: str
    name: NotRequired[str | None]  # items only


class PathStep(TypedDict):
    relation: str
    attention: float
    type: str
    id: str
    name: NotRequired[str | None]


class ExplanationPath(TypedDict):
    score: float
    steps: list[PathStep]


class Explanation(TypedDict):
    """``GET /v1/users/{user_id}/candidates/{item_id}/explain``."""

    user_id: str
    item: GraphNode
    score: float
    already_seen: bool
    paths: list[ExplanationPath]
    model: ModelSummary
    took_ms: float


@with_config(ConfigDict(extra="allow"))  # the loader's info is free-form: other keys pass through
class RankerInfo(TypedDict, total=False):
    name: str | None
    version: str | int | None
    alias: str | None
    run_id: str | None
    snapshot_hash: str | None
    model: str | None
    dataset: str | None
    alpha: float  # fusion weight of the ranking score
    default_num_candidates: int
    trained_with_retriever: str | None


@with_config(ConfigDict(extra="allow"))
class ModelInfo(TypedDict, total=False):
    """``GET /v1/model``: the loader's info (the pipeline's keys first), the retriever's, the index."""

    name: str | None  # registered model name
    version: str | int | None
    alias: str | None
    run_id: str | None
    model: str | None
    dataset: str | None
    snapshot_hash: str | None
    index: dict[str, Any]  # the published index's kind, ntotal, ann_recall
    kind: Required[str]  # "embedding" | "multi_interest"
    num_interests: int  # multi-interest retrievers, down to merge_rules
    merge_rule: str
    diversity_weight: float
    max_length: int
    merge_rules: list[str]
    index_kind: Required[str]
    n_items: Required[int]
    n_users: Required[int]
    ranker: RankerInfo  # when a ranking model is loaded


class Health(TypedDict):
    status: str  # "ok"


class Ready(TypedDict):
    status: str  # "ready"
    model: ModelInfo


class NotReady(TypedDict):
    status: str  # "unavailable"
    detail: str


class ItemEmbedding(TypedDict, total=False):
    method: Required[str]  # "inductive_kgat"
    ego: str  # the layer-0 estimate: "transr" | "mean" | "regress" | "zero"
    ego_selection: str  # "validation" (chosen at export) | "default"
    use_attention: bool


class PostedItem(TypedDict):
    """``POST /v1/items`` (201)."""

    item_id: str
    position: int  # the item's row in this worker's live index (the trained catalogue comes first)
    n_items: int  # items this worker serves now
    facts: int  # distinct facts the vector was computed from
    embedding: ItemEmbedding
    model: ModelSummary
    took_ms: float


class ReloadReport(TypedDict):
    """``POST /admin/reload``."""

    status: str  # "reloaded" | "unchanged" | "failed"
    model: ModelSummary | None  # what serves after the call
    previous: NotRequired[ModelSummary | None]  # "reloaded": what served before
    detail: NotRequired[str]  # "failed": why (the old version keeps serving)
    seconds: NotRequired[float]


class ErrorMessage(BaseModel):
    """Every error but 422: ``{"detail": "<short message>"}``."""

    detail: str


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationErrors(BaseModel):
    """422: FastAPI's shape (``detail``: one entry per problem), plus ``message``, all in one line."""

    detail: list[FieldError]
    message: str


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorMessage, "description": description}


#: Declared on every route that can answer them (the 422 is declared by FastAPI itself).
COMMON_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _error("malformed request (e.g. invalid JSON)"),
    401: _error("missing or wrong bearer token"),
    413: _error("request body too large"),
    422: {"model": ValidationErrors, "description": "invalid parameters or body"},
}
MODEL_ERRORS: dict[int | str, dict[str, Any]] = {
    **COMMON_ERRORS,
    404: _error("unknown user or item"),
    503: _error("no model (or no ranker) loaded"),
}
ITEM_ERRORS: dict[int | str, dict[str, Any]] = {
    **COMMON_ERRORS,
    401: _error("missing or wrong bearer token"),
    403: _error("no token configured: posting items is disabled"),
    409: _error("the item is in the catalogue or was posted already, or the served model cannot embed new items"),
    503: _error("no model loaded"),
}


# ---------------------------------------------------------------------------- dependencies
# `async def` and flat: each reads app.state itself (module docstring, "Latency").
async def serving_state(request: Request) -> ServingState:
    return request.app.state.kgrec


State = Annotated[ServingState, Depends(serving_state)]


def _two_stage(served: Served) -> TwoStageService:
    if served.two_stage is None:
        raise ServiceUnavailable(
            "no ranking model loaded: register one with `kgrec pipeline --ranker kcan`; the service "
            "picks it up at its next registry poll or on POST /admin/reload"
        )
    return served.two_stage


def _merge_kwargs(retriever: Retriever, merge: str | None, diversity: float | None) -> dict[str, Any]:
    if not retriever.supports_merge:
        return {}
    return {key: value for key, value in (("merge", merge), ("diversity", diversity)) if value is not None}


def _retrieval_kwargs(state: ServingState, retriever: Retriever, merge: str | None, diversity: float | None,
                      fresh: int | None) -> dict[str, Any]:
    """The keyword arguments this retriever takes: the merge rule (multi-interest) and the fresh
    slots (retrievers that take posted items; the request's, else the service's setting)."""
    kwargs = _merge_kwargs(retriever, merge, diversity)
    fresh = state.fresh_slots if fresh is None else fresh
    if fresh and getattr(retriever, "supports_fresh", False):
        kwargs["fresh"] = fresh
    return kwargs


def _took_ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1e3, 3)


def _observe_retrieval(metrics: ServiceMetrics, seconds: float, result: Any) -> None:
    merge_ms = getattr(result, "merge_ms", 0.0)
    metrics.observe_stage("retrieve", max(0.0, seconds - merge_ms / 1e3))
    if merge_ms:
        metrics.observe_stage("merge", merge_ms / 1e3)


_bearer = HTTPBearer(auto_error=False, description="the service's token ($KGREC_SERVE_TOKEN)")
BearerCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


class _Auth:
    """``Authorization: Bearer <token>`` check (constant-time); 401 when it is missing or wrong, 403
    when the service has no token (``what`` -- the admin endpoints, item posting -- is then disabled)."""

    def __init__(self, token: str | None, what: str = "admin endpoints are"):
        self.token = token
        self.what = what

    async def __call__(self, credentials: BearerCredentials) -> None:
        if self.token is None:
            raise HTTPException(403, f"{self.what} disabled: start the service with $KGREC_SERVE_TOKEN "
                                     "or --token-file")
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


# ---------------------------------------------------------------------------- response bytes
class JSONBytes(JSONResponse):
    """A body already serialised to JSON (``application/json``, like FastAPI's own answers). A
    ``JSONResponse`` so that FastAPI documents the route's ``response_model`` as its JSON body."""

    def render(self, content: bytes) -> bytes:
        return content


def candidates_json(body: dict[str, Any]) -> bytes:
    """The JSON bytes of a candidates answer, built in the declared key order by the handler.
    orjson with numpy scalars allowed (a retriever's stray ``np.float32`` serialises as a float);
    NaN and infinities become ``null``, as pydantic writes them."""
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def _user_candidates_body(state: ServingState, user_id: str, k: int, merge: str | None,
                          diversity: float | None, fresh: int | None) -> bytes:
    served = state.ready()
    retriever = served.retriever
    t0 = time.perf_counter()
    result = retriever.for_user(user_id, k, **_retrieval_kwargs(state, retriever, merge, diversity, fresh))
    _observe_retrieval(state.metrics, time.perf_counter() - t0, result)
    return candidates_json({
        "user_id": user_id,
        "k": k,
        "model": served.summary,
        **result.response_fields(),
        "candidates": result.records(),
        "took_ms": _took_ms(t0),
    })


def _history_candidates_body(state: ServingState, body: HistoryRequest) -> bytes:
    served = state.ready()
    retriever = served.retriever
    t0 = time.perf_counter()
    kwargs = _retrieval_kwargs(state, retriever, body.merge, body.diversity, body.fresh)
    result = retriever.for_history(body.item_ids, body.k, **kwargs)
    _observe_retrieval(state.metrics, time.perf_counter() - t0, result)
    return candidates_json({
        "k": body.k,
        "model": served.summary,
        **result.response_fields(),
        "candidates": result.records(),
        "unknown_item_ids": result.unknown_item_ids,
        "took_ms": _took_ms(t0),
    })


# ---------------------------------------------------------------------------- fast lane
# FastAPI spends ~0.15-0.2 ms of CPU per request on its own machinery for the candidates routes
# (per-request dependency solving that inspects every parameter's annotation, the route handler rebuilt
# for an included router), half as much as the HNSW search itself at 1M items (~0.25-0.45 ms). The hot routes' endpoints carry a
# `fast_lane`: it answers a request whose parameters are plainly well-formed (a short, plain query
# string; a JSON body that validates) with the very function the FastAPI handler calls, and returns
# None for anything else, which then takes the full FastAPI path -- so every error answer (422, 400,
# 401, ...) and every unusual-but-valid request (percent-encoding, unknown query keys, ...) is
# FastAPI's own. What both paths share: the route (`scope["route"]`, set by the router: metrics and
# the access log label it the same), the edge middleware, the app's exception handlers (a 404 or 503
# raised in the lane is answered by the same handler), the answer bytes. The lane runs only in apps
# built by `create_app`, which records whether a token guards these routes (`_LaneConfig`): the exact
# header `Authorization: Bearer <token>`; any other form goes to FastAPI's HTTPBearer check.
_QUERY_PLAIN = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-=&")
_MERGES = frozenset(get_args(MergeParam))


class _LaneConfig:
    __slots__ = ("authorization",)

    def __init__(self, token: str | None):
        #: the exact Authorization header value that passes, None when no token guards the routes
        self.authorization = None if token is None else b"Bearer " + token.encode()

    def allows(self, scope: Scope) -> bool:
        if self.authorization is None:
            return True
        for name, value in scope["headers"]:
            if name == b"authorization":
                return hmac.compare_digest(value, self.authorization)
        return False


class FastLaneRoute(APIRoute):
    """An ``APIRoute`` that first offers the request to its endpoint's ``fast_lane`` (see above)."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        lane = getattr(self.endpoint, "fast_lane", None)
        config = getattr(scope.get("app"), "kgrec_lane", None)
        if lane is not None and config is not None and config.allows(scope):
            response, receive = await lane(scope, receive)
            if response is not None:
                await response(scope, receive, send)
                return
        await super().handle(scope, receive, send)


def _plain_query(query: bytes, allowed: frozenset[str]) -> dict[str, str] | None:
    """``k=100&merge=max`` as a dict when every part is ``key=value`` with an allowed key (once),
    a non-empty value and nothing that needs decoding; None otherwise (FastAPI parses it)."""
    if not query:
        return {}
    if len(query) > 200 or not _QUERY_PLAIN.issuperset(query):
        return None
    out: dict[str, str] = {}
    for part in query.decode("ascii").split("&"):
        key, sep, value = part.partition("=")
        if not sep or not value or "=" in value or key not in allowed or key in out:
            return None
        out[key] = value
    return out


def _plain_k(value: str | None, default: int = 100) -> int | None:
    if value is None:
        return default
    if not value.isdigit() or value[0] == "0" or len(value) > 4:
        return None
    k = int(value)
    return k if 1 <= k <= MAX_K else None


def _plain_count(value: str | None) -> tuple[bool, int | None]:
    """``fresh``: absent, or 0 .. MAX_K in plain digits."""
    if value is None:
        return True, None
    if not value.isdigit() or (len(value) > 1 and value[0] == "0") or len(value) > 4:
        return False, None
    return int(value) <= MAX_K, int(value)


def _plain_merge(value: str | None) -> tuple[bool, str | None]:
    return (value is None or value in _MERGES), value


def _plain_diversity(value: str | None) -> tuple[bool, float | None]:
    if value is None:
        return True, None
    head, _, tail = value.partition(".")
    if not head.isdigit() or len(head) > 3 or (len(head) > 1 and head[0] == "0") or (
            tail and (not tail.isdigit() or len(tail) > 6)) or value.endswith("."):
        return False, None
    number = float(value)
    return 0.0 <= number <= MAX_DIVERSITY, number


async def _user_candidates_lane(scope: Scope, receive: Receive) -> tuple[Response | None, Receive]:
    if scope["method"] != "GET":
        return None, receive
    user_id = scope.get("path_params", {}).get("user_id")
    query = _plain_query(scope["query_string"], _USER_QUERY_KEYS)
    if not isinstance(user_id, str) or len(user_id) > MAX_ID_LENGTH or query is None:
        return None, receive
    k = _plain_k(query.get("k"))
    merge_ok, merge = _plain_merge(query.get("merge"))
    diversity_ok, diversity = _plain_diversity(query.get("diversity"))
    fresh_ok, fresh = _plain_count(query.get("fresh"))
    if k is None or not merge_ok or not diversity_ok or not fresh_ok:
        return None, receive
    state: ServingState = scope["app"].state.kgrec
    return JSONBytes(_user_candidates_body(state, user_id, k, merge, diversity, fresh)), receive


_USER_QUERY_KEYS = frozenset({"k", "merge", "diversity", "fresh"})


def _replaying(messages: list[Message], receive: Receive) -> Receive:
    """``receive`` that hands out ``messages`` again first (the body the lane read), then reads on."""
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


async def _history_candidates_lane(scope: Scope, receive: Receive) -> tuple[Response | None, Receive]:
    if scope["method"] != "POST" or scope.get("query_string"):
        return None, receive
    content_type = [value for name, value in scope["headers"] if name == b"content-type"]
    if content_type != [b"application/json"]:
        return None, receive
    messages: list[Message] = []
    chunks: list[bytes] = []
    while True:  # the edge's receive counts the body (413 beyond its limit, raised from here as there)
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return None, _replaying(messages, receive)
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    replay = _replaying(messages, receive)
    raw = b"".join(chunks)
    if not raw:
        return None, replay
    try:  # what FastAPI does: json.loads, then the model's validation of the document
        body = HistoryRequest.model_validate(json.loads(raw))
    except (ValueError, ValidationError):  # malformed or invalid: FastAPI answers it (400 / 422)
        return None, replay
    state: ServingState = scope["app"].state.kgrec
    return JSONBytes(_history_candidates_body(state, body)), replay


# ---------------------------------------------------------------------------- routers
health = APIRouter(tags=["health"])
ops = APIRouter(tags=["operations"])
admin = APIRouter(prefix="/admin", tags=["admin"], responses={401: _error("missing or wrong bearer token"),
                                                            403: _error("no token configured")})
retrieval = APIRouter(prefix="/v1", tags=["retrieval"], responses=MODEL_ERRORS, route_class=FastLaneRoute)
catalogue = APIRouter(prefix="/v1", tags=["catalogue"], responses=ITEM_ERRORS)
two_stage = APIRouter(prefix="/v1", tags=["two-stage"], responses=MODEL_ERRORS)

UserId = Annotated[str, PathParam(max_length=MAX_ID_LENGTH, description="raw user id")]
ItemId = Annotated[str, PathParam(max_length=MAX_ID_LENGTH, description="raw item id")]


@health.api_route("/healthz", methods=["GET", "HEAD"])
async def healthz() -> Health:
    return {"status": "ok"}


@health.api_route("/readyz", methods=["GET", "HEAD"], response_model=Ready,
                  responses={503: {"model": NotReady, "description": "not loaded"}})
async def readyz(state: State) -> Ready | JSONResponse:
    served = state.current
    if served is None:
        return JSONResponse({"status": "unavailable", "detail": state.error}, status_code=503)
    return {"status": "ready", "model": state.model_info(served)}


@ops.get("/metrics", response_class=PlainTextResponse, responses={401: _error("missing or wrong bearer token")})
async def metrics(state: State) -> Response:
    """Prometheus exposition (all workers' samples under ``--workers``)."""
    body, content_type = state.metrics.render()
    return Response(body, media_type=content_type)


# The candidates answers are serialised once, by orjson (module docstring, "Response bodies"): the
# handler returns a Response, so FastAPI neither validates nor re-encodes it; `response_model` keeps
# the body's schema in the OpenAPI document.
@retrieval.get("/users/{user_id}/candidates", response_model=UserCandidates, response_class=JSONBytes)
async def user_candidates(
    user_id: UserId,
    state: State,
    k: int = Query(100, ge=1, le=MAX_K),
    merge: MergeParam | None = Query(None),
    diversity: float | None = Query(None, ge=0.0, le=MAX_DIVERSITY),
    fresh: int | None = Query(None, ge=0, le=MAX_K, description=(
        "slots of the k reserved for items posted since training (POST /v1/items); default: the "
        "service's fresh_slots setting")),
) -> Response:
    return JSONBytes(_user_candidates_body(state, user_id, k, merge, diversity, fresh))


@retrieval.post("/candidates", response_model=HistoryCandidates, response_class=JSONBytes)
async def history_candidates(body: HistoryRequest, state: State) -> Response:
    return JSONBytes(_history_candidates_body(state, body))


user_candidates.fast_lane = _user_candidates_lane  # type: ignore[attr-defined]
history_candidates.fast_lane = _history_candidates_lane  # type: ignore[attr-defined]


@retrieval.get("/users/{user_id}/candidates/{item_id}/explain")
async def explain(
    user_id: UserId,
    item_id: ItemId,
    state: State,
    max_paths: int = Query(5, ge=1, le=50),
) -> Explanation:
    served = state.ready()
    t0 = time.perf_counter()
    payload = served.retriever.explain(user_id, item_id, max_paths)
    state.metrics.observe_stage("explain", time.perf_counter() - t0)
    return {**payload, "model": served.summary, "took_ms": _took_ms(t0)}


@retrieval.get("/model")
async def model(state: State) -> ModelInfo:
    """What is served, and the state of its reloads (``reload``)."""
    return state.model_info(state.ready())


# `async def` like the other handlers: one 200-pair KCAN forward (~4 ms on one thread) costs
# less on the event loop than the threadpool hop plus per-thread torch setup (measured: p99
# 11.2 -> 9.3 ms, benchmarks/two_stage_latency.py). Scale throughput with uvicorn workers.
@two_stage.get("/users/{user_id}/ranked")
async def ranked(
    user_id: UserId,
    state: State,
    k: int | None = Query(None, ge=1, le=MAX_K, description="answered; at most n, else 422 (default: min(20, n))"),
    n: int | None = Query(None, ge=1, le=MAX_K, description="candidates retrieved (default: the ranker's)"),
) -> RankedCandidates:
    served = state.ready()
    service = _two_stage(served)
    if k is None:  # the default never contradicts an explicit n
        k = min(DEFAULT_RANKED_K, n if n is not None else service.ranker.num_candidates)
    result = service.for_user(user_id, k, n)
    timings = result.timings_ms
    state.metrics.observe_stage("retrieve", timings["retrieval"] / 1e3)
    state.metrics.observe_stage("rerank", timings["ranking"] / 1e3)
    return {
        "user_id": user_id,
        "k": k,
        "n": result.num_candidates,
        "model": served.summary,
        "ranker": served.ranker_summary,
        "candidates": result.records(),
        "timings_ms": timings,
    }


@two_stage.get("/latency")
async def latency(state: State) -> LatencyReport:
    """Percentiles of this worker's Prometheus histograms (``/metrics`` has the buckets)."""
    _two_stage(state.ready())
    total = state.metrics.quantiles("kgrec_http_request_duration_seconds",
                                    {"endpoint": RANKED_ROUTE, "method": "GET"})
    answered = state.metrics.registry.get_sample_value(
        "kgrec_http_requests_total", {"endpoint": RANKED_ROUTE, "method": "GET", "status": "200"}) or 0
    return {"two_stage": {
        "requests": int(answered),
        "retrieval": state.metrics.stage_quantiles("retrieve"),
        "ranking": state.metrics.stage_quantiles("rerank"),
        "total": total,
    }}


class _FactsError(InvalidRequestError):
    """No facts, or more than the service's limit: 422 at ``body.facts``."""

    loc = ["body", "facts"]


@catalogue.post("/items", status_code=201)
async def post_item(body: NewItem, state: State) -> PostedItem:
    """Add an item after training: its retrieval vector from its KG facts through the served KGAT's
    layers (:mod:`kgrec.serving.inductive`), added to the live index at once (candidate answers can
    return it from this answer on) and appended durably to the version's overlay, which every
    worker applies and the next training run merges into its data (:mod:`kgrec.serving.overlay`)."""
    served = state.ready()
    limit = state.max_item_facts
    if not body.facts:
        raise _FactsError("facts must hold at least one {relation, entity} fact")
    if len(body.facts) > limit:
        raise _FactsError(f"at most {limit} facts per item, got {len(body.facts)}")
    t0 = time.perf_counter()
    facts = [(f.relation, f.entity) for f in body.facts]
    served, result = await asyncio.to_thread(state.post_item, body.item_id, facts, body.name)
    return {
        "item_id": result.item_id,
        "position": result.position,
        "n_items": result.n_items,
        "facts": result.facts,
        "embedding": result.embedding,
        "model": served.summary,
        "took_ms": _took_ms(t0),
    }


@admin.post("/reload")
async def reload(state: State, force: bool = Query(False, description="reload even if the version is unchanged")
                 ) -> ReloadReport:
    """Load the version the alias names now, verify it, and swap it in (the old one serves until
    then, and keeps serving if the new one fails: ``status`` is then ``failed``)."""
    return await asyncio.to_thread(state.reload, force, "admin")


#: Thread-pool sizes a ``--workers`` process starts with (``threads_per_worker``).
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
RANKED_ROUTE = "/v1/users/{user_id}/ranked"
DEFAULT_RANKED_K = 20
WORKER_HEALTHCHECK_SECONDS = 300.0


# ---------------------------------------------------------------------------- errors
def _validation_body(errors: list[dict[str, Any]]) -> dict[str, Any]:
    message = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors) or "invalid request"
    return {"detail": errors, "message": message[:1000]}


async def _candidate_error(request: Request, exc: CandidateError) -> JSONResponse:
    if exc.status_code == 422:  # same body as every other 422 (the OpenAPI schema has one)
        loc = exc.loc or (["body", "item_ids"] if request.method == "POST" else ["query"])
        body = _validation_body([{"loc": loc, "msg": exc.message, "type": "value_error"}])
        return JSONResponse(body, status_code=422)
    return JSONResponse({"detail": exc.message}, status_code=exc.status_code)


async def _unavailable(request: Request, exc: ServiceUnavailable) -> JSONResponse:
    return JSONResponse({"detail": public_message(exc.message)}, status_code=503)


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = []
    for e in exc.errors():
        loc = [p if isinstance(p, int) else str(p) for p in e.get("loc", ())]
        if e.get("type") == "json_invalid":  # not a valid document at all: 400, like any parser
            pos = loc[1] if len(loc) > 1 else "?"
            cause = (e.get("ctx") or {}).get("error")
            message = f"malformed JSON body at character {pos}" + (f": {cause}" if cause else "")
            return JSONResponse({"detail": message}, status_code=400)
        # the message, never the input: a 1 MB id is not echoed back
        errors.append({"loc": loc, "msg": quote_limit(str(e.get("msg", ""))), "type": str(e.get("type", ""))})
    return JSONResponse(_validation_body(errors), status_code=422)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error answering %s %s", request.method, request.url.path[:200])
    return JSONResponse({"detail": f"internal error (request id {request_id_var.get()})"}, status_code=500)


def quote_limit(text: str) -> str:
    return text if len(text) <= QUOTE_LIMIT else text[:QUOTE_LIMIT] + "..."


# ---------------------------------------------------------------------------- app
@asynccontextmanager
async def _lifespan(app: FastAPI, *, poll_interval_s: float, fail_fast: bool, overlay_poll_interval_s: float = 0.0):
    state: ServingState = app.state.kgrec
    loaded = state.current is not None or await asyncio.to_thread(state.load)
    if not loaded and fail_fast:
        raise RuntimeError(f"--fail-fast: the model cannot be loaded: {state.error}")
    tasks = []
    if poll_interval_s > 0:
        tasks.append(asyncio.create_task(_poll(state, poll_interval_s), name="kgrec-registry-poll"))
    if overlay_poll_interval_s > 0 and state.overlay_root is not None:
        tasks.append(asyncio.create_task(_watch_overlay(state, overlay_poll_interval_s), name="kgrec-overlay-poll"))
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        state.unload()


async def _watch_overlay(state: ServingState, interval: float) -> None:
    """Every ``interval`` seconds, one ``stat`` of the served version's overlay; when another worker
    appended to it, its new items are embedded and added in a thread (the event loop keeps answering)."""
    while True:
        await asyncio.sleep(interval)
        served = state.current
        if served is None or served.items is None or not served.items.changed():
            continue
        try:
            added = await asyncio.to_thread(served.items.catch_up)
        except Exception:  # a bad read must not stop the watcher; the next tick retries
            log.exception("could not apply the posted items other workers added")
            continue
        if added:
            log.info("applied %d items posted to other workers", added)


async def _poll(state: ServingState, interval: float) -> None:
    """Ask the registry every ``interval`` seconds whether the alias moved (a reload runs in a
    thread: the event loop keeps answering meanwhile)."""
    while True:
        await asyncio.sleep(interval)
        await asyncio.to_thread(state.reload, False, "poll")


def create_app(
    load_service: Loader,
    load_ranker: RankerLoader | None = None,
    *,
    token: str | None = None,
    require_token: bool = False,
    poll_interval_s: float = 0.0,
    fail_fast: bool = False,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    cors_origins: tuple[str, ...] = (),
    access_log: bool = True,
    torch_threads: int | None = 1,
    fast_lane: bool = True,
    overlay_root: Path | None = None,
    max_item_facts: int = DEFAULT_MAX_ITEM_FACTS,
    overlay_poll_interval_s: float = 1.0,
    fresh_slots: int = 0,
) -> FastAPI:
    """The service app. ``token``: the bearer token of ``/admin/*`` and ``POST /v1/items`` (both are
    disabled without one); ``require_token``: every endpoint but the health probes needs it (a bind
    beyond loopback); ``poll_interval_s``: how often the loaders are asked for a new version (0:
    never); ``fast_lane``: False sends every request through FastAPI's parameter handling (the tests
    compare); ``overlay_root``: the serve cache root where posted items' overlays are kept (None:
    posting answers 409); ``max_item_facts``: facts per posted item; ``overlay_poll_interval_s``: how
    often the served version's overlay is checked for other workers' posts (0: never); ``fresh_slots``:
    candidate slots reserved for posted items when a request does not say (``fresh``)."""
    metrics = ServiceMetrics()
    app = FastAPI(
        title="kgrec candidates",
        lifespan=partial(_lifespan, poll_interval_s=poll_interval_s, fail_fast=fail_fast,
                         overlay_poll_interval_s=overlay_poll_interval_s),
        exception_handlers={
            CandidateError: _candidate_error,
            ServiceUnavailable: _unavailable,
            RequestValidationError: _invalid,
            Exception: _unexpected,
        },
    )
    app.state.kgrec = ServingState(load_service, load_ranker, metrics, torch_threads=torch_threads,
                                   overlay_root=None if overlay_root is None else Path(overlay_root),
                                   max_item_facts=max_item_facts, fresh_slots=fresh_slots)
    if require_token and token is None:
        raise ValueError("require_token needs a token")
    # the fast lane of the candidates routes (FastLaneRoute): on, with the token that guards them
    app.kgrec_lane = _LaneConfig(token if require_token else None) if fast_lane else None
    guard = [Depends(_Auth(token))]
    everywhere = guard if require_token else []
    # matched in this order: the hot routes first
    for router in (retrieval, two_stage):
        app.include_router(router, dependencies=everywhere)
    app.include_router(admin, dependencies=guard)
    # a catalogue write: the token always, as /admin (module docstring)
    app.include_router(catalogue, dependencies=[Depends(_Auth(token, "posting items is"))])
    app.include_router(ops, dependencies=everywhere)
    app.include_router(health)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST", "HEAD"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
                           expose_headers=["X-Request-ID"])
    app.add_middleware(RequestEdge, metrics=metrics, max_body_bytes=max_body_bytes, access_log=access_log)
    return app


def app_from_settings(settings: ServeSettings) -> FastAPI:
    """The app ``kgrec serve`` runs: the registered ``model_name@alias`` (and its ranker), watched
    every ``poll_interval_s``, with the settings' limits and token."""
    threads = settings.threads_per_worker
    faiss.omp_set_num_threads(threads)
    cache = ServeCache(settings.serve_cache_dir)
    loader = RegisteredModel(settings.tracking, settings.model_name, settings.alias, cache=cache,
                             torch_threads=threads)
    ranker = None
    if not settings.no_ranker:
        # the default ranker is optional (retrieval-only deployments); a named one must load
        ranker = RegisteredRanker(
            settings.tracking, settings.ranker_name or registered_ranker_name(settings.model_name),
            settings.ranker_alias, cache=cache, required=settings.ranker_name is not None,
        )
    return create_app(
        loader, ranker,
        token=settings.token(),
        require_token=not settings.loopback,
        poll_interval_s=settings.poll_interval_s,
        fail_fast=settings.fail_fast,
        max_body_bytes=settings.max_body_bytes,
        cors_origins=settings.cors_origins,
        access_log=settings.access_log,
        torch_threads=threads,
        overlay_root=cache.root,
        max_item_facts=settings.max_item_facts,
        fresh_slots=settings.fresh_slots,
        overlay_poll_interval_s=settings.overlay_poll_interval_s,
    )


def app_from_env() -> FastAPI:
    """App factory of each ``--workers`` process (``uvicorn ...:app_from_env --factory``): the
    settings come as JSON in ``$KGREC_SERVE_SETTINGS``."""
    settings = ServeSettings.model_validate_json(os.environ[SETTINGS_ENV])
    configure_logging(settings.log_level, settings.log_format)
    return app_from_settings(settings)


def bundle_loader(directory: str | Path, info: dict[str, Any] | None = None) -> Loader:
    """Loader for a bundle directory of either kind; uses ``<directory>/index`` when present, else
    builds one."""

    def load() -> tuple[Retriever, dict[str, Any]]:

        index = None
        if (Path(directory) / INDEX_DIRNAME).is_dir():
            index, _ = load_index(Path(directory) / INDEX_DIRNAME)
        service = open_service(Path(directory), index)
        merged = {
            "model": service.bundle.meta.get("model"),
            "dataset": service.bundle.meta.get("dataset"),
            **(info or {}),
        }
        return service, merged

    return load


def _preload(state: ServingState) -> None:
    if not state.load():
        raise SystemExit(f"kgrec serve: error: --fail-fast: the model cannot be loaded: {state.error}")


def serve(settings: ServeSettings) -> None:
    """Run the service with uvicorn: one process, or ``settings.workers`` processes that each build
    the app from the same settings (uvicorn's own supervisor; Prometheus samples shared through a
    multi-process directory that is removed at exit). uvicorn's access log is off: ours is JSON.
    The event loop is ``settings.loop`` (asyncio by default, see :class:`ServeSettings`), the HTTP
    parser uvicorn's choice (httptools when installed, else h11). The workers listen on one
    ``SO_REUSEPORT`` socket each, with Nagle's algorithm off (:func:`_run_workers`)."""
    import uvicorn

    configure_logging(settings.log_level, settings.log_format)
    common = dict(host=settings.host, port=settings.port, log_config=None, access_log=False,
                  log_level=settings.log_level, timeout_graceful_shutdown=10, loop=settings.loop)
    if settings.workers == 1:
        app = app_from_settings(settings)
        if settings.fail_fast:
            _preload(app.state.kgrec)  # loaded here, the lifespan keeps it
        uvicorn.run(app, **common)
        return
    if settings.fail_fast:
        # uvicorn's supervisor restarts a worker whose startup fails, forever: check once, here
        state = app_from_settings(settings).state.kgrec
        _preload(state)
        state.unload()
        del state
    with tempfile.TemporaryDirectory(prefix="kgrec-metrics-") as metrics_dir:
        os.environ[MULTIPROC_ENV] = metrics_dir
        os.environ[SETTINGS_ENV] = settings.model_dump_json()
        # the workers import numpy/faiss/torch afresh: their OpenMP and BLAS pools start at this size
        # (an explicit setting in the environment wins)
        for name in THREAD_ENV:
            os.environ.setdefault(name, str(settings.threads_per_worker))
        # a worker is ready once its model is loaded (the lifespan): give it time, and do not
        # take a long GIL-bound reload for a dead worker
        config = uvicorn.Config("kgrec.serving.service:app_from_env", factory=True, workers=settings.workers,
                                timeout_worker_healthcheck=WORKER_HEALTHCHECK_SECONDS, **common)
        _run_workers(config)


def _run_workers(config: Any) -> None:
    """What ``uvicorn.run`` does for ``workers > 1`` (uvicorn's supervisor: health checks, restarts),
    with two changes to how connections reach the workers.

    * Each worker listens on its own ``SO_REUSEPORT`` socket (Linux): the kernel spreads the
      connections over the workers by their addresses. uvicorn's one shared listener lets the worker
      that wakes first accept every connection that is waiting, so a client that opens its keep-alive
      connections at once (a load balancer's pool, wrk) often had all of them on ONE worker: with 2
      workers on 2 cores, 16 connections answered ~1,150 req/s where a balanced spread gives ~2,000
      (benchmarks/serve_scale.py, per-process CPU). A worker's socket is created in the worker (a
      :class:`_ReusePortListener` is pickled to it) and closed with it, so a dead worker takes no
      connections; it listens once the worker's model is loaded (uvicorn starts listening after the
      lifespan). The parent binds the port first, without listening: a port in use fails there, and
      port 0 is resolved once for all workers. Elsewhere (no ``SO_REUSEPORT``): the shared listener.
    * Nagle's algorithm is off on every connection (``TCP_NODELAY``, on the listener: Linux copies it
      to the connections it accepts, and the listener says ``IPPROTO_TCP``, which asyncio's loop
      wants before it sets the option itself). uvicorn's shared listener, ``socket.socket(family)``,
      records protocol 0: without uvloop (which always sets it) every answer written in two parts
      (headers, body) waited for the client's delayed ACK, ~40 ms a request (23 req/s on one
      connection)."""
    import inspect

    import uvicorn
    from uvicorn.supervisors import Multiprocess

    if _REUSE_PORT and config.uds is None and config.fd is None:
        family = socket.AF_INET6 if config.host and ":" in config.host else socket.AF_INET
        try:
            reserved = _bind_listener(family, (config.host, config.port))
        except OSError as exc:
            log.error("cannot bind %s:%s: %s", config.host, config.port, exc)
            raise SystemExit(3) from exc  # uvicorn's STARTUP_FAILURE
        address = (config.host, reserved.getsockname()[1])
        sockets: list[Any] = [_ReusePortListener(family, address)]
        log.info("listening on http://%s:%d with %d workers, one SO_REUSEPORT socket each",
                 config.host, address[1], config.workers)
    else:
        bound = config.bind_socket()
        listener = socket.socket(fileno=bound.detach())  # family, type and protocol from the descriptor
        if listener.family in (socket.AF_INET, socket.AF_INET6):
            listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reserved, sockets = listener, [listener]
    options: dict[str, Any] = {"sockets": sockets}
    if "target" in inspect.signature(Multiprocess.__init__).parameters:  # uvicorn < 0.30's supervisor
        options["target"] = uvicorn.Server(config=config).run
    try:
        Multiprocess(config, **options).run()
    except KeyboardInterrupt:
        pass
    finally:
        reserved.close()


#: Linux spreads the connections of a SO_REUSEPORT group over its listeners (other systems need not).
_REUSE_PORT = sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def _bind_listener(family: int, address: tuple[str, int]) -> socket.socket:
    """A TCP socket bound to ``address`` with ``SO_REUSEPORT`` and ``TCP_NODELAY`` (not listening)."""
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


class _ReusePortListener:
    """Stands for a worker's own listener in the supervisor: it pickles (to the spawned worker) as a
    call of :func:`_bind_listener`, so the socket is created, and owned, by the worker."""

    def __init__(self, family: int, address: tuple[str, int]):
        self.family, self.address = family, address

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return _bind_listener, (self.family, self.address)
