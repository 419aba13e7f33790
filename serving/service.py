"""FastAPI candidates service.

``create_app(load_service, load_ranker=None)`` builds the app; ``load_service()`` runs once at
startup (lifespan) and returns ``(service, model_info)``, the service being any
:class:`~kgrec.serving.protocols.Retriever`: a ``CandidateService`` (embedding retriever) or a
``MultiInterestService`` (multi-interest retriever, :mod:`kgrec.serving.multi_interest`).
``model_info`` is free-form JSON describing what is served; the keys the pipeline uses are ``name``
(registered model name), ``version``, ``alias``, ``run_id``, ``model``, ``dataset``. A loader that
raises leaves the process up: ``/healthz`` stays 200, ``/readyz`` answers 503 with the error, and the
candidate endpoints answer 503.

Endpoints::

    GET  /healthz                              liveness
    GET  /readyz                               200 + model info when loaded, else 503 + error
    GET  /v1/model                             model info (+ index kind, catalogue size)
    GET  /v1/users/{user_id}/candidates?k=100[&merge=max|weighted|mixture|controllable][&diversity=0.5]
                                               known user, seen items excluded
    GET  /v1/users/{user_id}/candidates/{item_id}/explain?max_paths=5
                                               top attention paths user -> item (KGAT models)
    POST /v1/candidates {"item_ids": [...], "k": 100, "merge": "max"|"weighted"|"mixture"|"controllable",
                         "diversity": 0.5}  (merge and diversity optional)
                                               unseen user from an ORDERED item history (oldest
                                               first; history excluded)
    GET  /v1/users/{user_id}/ranked?k=20&n=200 two-stage: the retriever's top n re-ranked by the
                                               ranking model; both scores and stage timings
    GET  /v1/latency                           per-stage p50/p90/p99 of the last 10,000 two-stage
                                               requests

The two-stage endpoints need ``load_ranker`` (``() -> (RankerBundle, info)`` or ``None`` for "no
ranker registered"); without a ranker they answer 503. A ranker that fails to load makes the whole
service unready: a deployment asked for two stages must not silently serve one.

Multi-interest retrievers compute the user's interests from the (last ``max_length`` items of the)
history, search the index once per interest and merge the lists (``merge``: the model's rule by
default; ``diversity`` is the controllable merge's lambda and a 422 with any other rule); every
candidate then carries ``interest`` (the index of the interest it came from) and the answer adds
``merge`` and ``interest_weights`` (and ``diversity`` for the controllable merge). Retrievers whose
``supports_merge`` is false (embedding retrievers) ignore ``merge`` and ``diversity``.

Errors are always 4xx JSON ``{"detail": ...}``: unknown user 404, bad ``k`` / ``n`` / ``merge`` / body
422, all posted items unknown 422, model (or ranker) not loaded 503.

Structure: the endpoints live on three module-level routers (``retrieval``, ``two_stage``,
``health``) that ``create_app`` includes, hot routes first (routes are matched in order). What the
lifespan loads lives in one :class:`ServingState` on ``app.state.kgrec``, so handlers close over
nothing; they get it through dependencies (:func:`ready_retriever`, :func:`ready_two_stage`,
:func:`serving_state`) and the ``ready_*`` ones raise the 503 while nothing is loaded. The services
are typed by the protocols of :mod:`kgrec.serving.protocols`, checked once when loaded.

Latency: handlers AND dependencies are ``async def`` on purpose (FastAPI runs a plain ``def``
dependency in the threadpool too), and no dependency depends on another (each nesting level is one
more resolution per request). One request is ~0.2 ms of CPU (faiss search + id mapping) with faiss
pinned to one OpenMP thread; hopping to the threadpool would cost about as much again. Scale
throughput with uvicorn workers.

Response bodies: every success body has a response type below (``TypedDict`` types, so they are in the
OpenAPI schema). Handlers return plain dicts and declare the type as their return annotation; FastAPI
validates the dict against it and pydantic-core writes the JSON bytes in one pass (no
``jsonable_encoder``). ``TypedDict`` rather than ``BaseModel`` on purpose: validation yields dicts
instead of ~100 model instances per candidate list (30-60 us less CPU per ``k=100`` request), and a
``NotRequired`` key that the handler leaves out is simply absent from the answer (``interest``,
``merge``, ``diversity``, ...), while a ``None`` it puts in stays ``null`` (``name``,
``ranking_score``), with no ``exclude_unset`` / ``exclude_none`` needed. Keys are written in the
declared order. Cost: ~35 us more CPU per ``k=100`` request than the ``ORJSONResponse`` it replaced
(response validation ~15 us; pydantic-core writes JSON in ~20 us where orjson took ~8). Error bodies
(``{"detail": ...}``) are ``JSONResponse`` objects built by the exception handlers.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, NotRequired, Required

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kgrec.serving.bundle import INDEX_DIRNAME
from kgrec.serving.candidates import CandidateError
from kgrec.serving.champion import open_service
from kgrec.serving.index import load_index
from kgrec.serving.protocols import Ranker, Retriever
from kgrec.serving.ranking import TwoStageService
from pydantic import BaseModel, ConfigDict, Field, with_config
from typing_extensions import TypedDict  # pydantic rejects typing.TypedDict on Python < 3.12

if TYPE_CHECKING:
    from kgrec.serving.ranking import RankerBundle, TwoStageService

log = logging.getLogger(__name__)

MAX_K = 1000
MAX_HISTORY = 500

Loader = Callable[[], "tuple[Retriever, dict[str, Any]]"]
RankerLoader = Callable[[], "tuple[RankerBundle, dict[str, Any]] | None"]
MergeParam = Literal["max", "weighted", "mixture", "controllable"]
#: Upper bound of the controllable merge's lambda in a request (beyond it the list is pure diversity).
MAX_DIVERSITY = 100.0


class HistoryRequest(BaseModel):
    """Body of ``POST /v1/candidates``: raw item ids (strings; integers are coerced) and ``k``."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    item_ids: list[str] = Field(..., min_length=1, max_length=MAX_HISTORY)
    k: int = Field(100, ge=1, le=MAX_K)
    merge: MergeParam | None = None  # multi-interest retrievers only (default: the model's rule)
    diversity: float | None = Field(None, ge=0.0, le=MAX_DIVERSITY)  # lambda of merge="controllable"


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


class ServiceUnavailable(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def _summary(info: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": info.get("name", info.get("registered_name")),
        "version": info.get("version"),
    }


# ---------------------------------------------------------------------------- state
@dataclass
class ServingState:
    """What the lifespan loaded (``app.state.kgrec``); ``retriever is None`` until it succeeds."""

    retriever: Retriever | None = None
    two_stage: TwoStageService | None = None  # the ranker, with its per-stage latency window
    info: dict[str, Any] = field(default_factory=dict)  # /readyz and /v1/model
    summary: dict[str, Any] = field(default_factory=dict)  # {"name", "version"} of the retriever
    ranker_summary: dict[str, Any] = field(default_factory=dict)  # the same for the ranker
    error: str | None = "model not loaded yet"

    def load(self, load_service: Loader, load_ranker: RankerLoader | None) -> None:
        """Run the loaders; on failure keep ``retriever`` None and record the error."""
        t0 = time.perf_counter()
        try:
            retriever, info = load_service()
            if not isinstance(retriever, Retriever):
                raise TypeError(
                    f"loader returned {type(retriever).__name__}, expected a Retriever "
                    "(CandidateService or MultiInterestService)"
                )
            self.info = {
                **dict(info or {}),
                **retriever.info(),
                "index_kind": retriever.index_kind,
                "n_items": retriever.n_items,
                "n_users": retriever.n_users,
            }
            self.summary = _summary(self.info)
            ranker = load_ranker() if load_ranker is not None else None
            if ranker is not None:

                bundle, ranker_info = ranker
                if not isinstance(bundle.model, Ranker):
                    raise TypeError(f"ranker bundle holds {type(bundle.model).__name__}, expected a Ranker")
                self.two_stage = TwoStageService(retriever, bundle)
                self.info["ranker"] = {**dict(ranker_info or {}), **self.two_stage.info()}
                self.ranker_summary = _summary(self.info["ranker"])
            self.retriever, self.error = retriever, None
            # the loaded model is long-lived: keep its objects out of the collector's scans so
            # generation-2 collections do not show up in the latency tail
            gc.collect()
            gc.freeze()
            log.info("model loaded in %.2fs: %s", time.perf_counter() - t0, self.summary)
        except Exception as exc:  # keep serving /healthz and report on /readyz
            self.two_stage = None
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("model load failed")

    def unload(self) -> None:
        self.retriever = self.two_stage = None


# ---------------------------------------------------------------------------- dependencies
# `async def` and flat: each reads app.state itself (module docstring, "Latency").
async def serving_state(request: Request) -> ServingState:
    return request.app.state.kgrec


async def ready_retriever(request: Request) -> Retriever:
    """The loaded retriever; 503 while none is."""
    return _ready(request.app.state.kgrec)


async def ready_two_stage(request: Request) -> TwoStageService:
    """The two-stage service; 503 while the retriever is not loaded or no ranker is registered."""
    state: ServingState = request.app.state.kgrec
    _ready(state)  # "model not loaded" wins over "no ranker"
    if state.two_stage is None:
        raise ServiceUnavailable(
            "no ranking model loaded: register one with `kgrec pipeline --ranker kcan` and "
            "restart the service"
        )
    return state.two_stage


def _ready(state: ServingState) -> Retriever:
    if state.retriever is None:
        raise ServiceUnavailable(f"model not loaded: {state.error}")
    return state.retriever


State = Annotated[ServingState, Depends(serving_state)]
ReadyRetriever = Annotated[Retriever, Depends(ready_retriever)]
ReadyTwoStage = Annotated["TwoStageService", Depends(ready_two_stage)]  # ranking imports torch: lazily


def _merge_kwargs(retriever: Retriever, merge: str | None, diversity: float | None) -> dict[str, Any]:
    if not retriever.supports_merge:
        return {}
    return {key: value for key, value in (("merge", merge), ("diversity", diversity)) if value is not None}


def _took_ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1e3, 3)


# ---------------------------------------------------------------------------- routers
health = APIRouter(tags=["health"])
retrieval = APIRouter(prefix="/v1", tags=["retrieval"])
two_stage = APIRouter(prefix="/v1", tags=["two-stage"])


@health.get("/healthz")
async def healthz() -> Health:
    return {"status": "ok"}


@health.get("/readyz", response_model=Ready, responses={503: {"model": NotReady, "description": "not loaded"}})
async def readyz(state: State) -> Ready | JSONResponse:
    if state.retriever is None:
        return JSONResponse({"status": "unavailable", "detail": state.error}, status_code=503)
    return {"status": "ready", "model": state.info}


@retrieval.get("/users/{user_id}/candidates")
async def user_candidates(
    user_id: str,
    retriever: ReadyRetriever,
    state: State,
    k: int = Query(100, ge=1, le=MAX_K),
    merge: MergeParam | None = Query(None),
    diversity: float | None = Query(None, ge=0.0, le=MAX_DIVERSITY),
) -> UserCandidates:
    t0 = time.perf_counter()
    result = retriever.for_user(user_id, k, **_merge_kwargs(retriever, merge, diversity))
    return {
        "user_id": user_id,
        "k": k,
        "model": state.summary,
        **result.response_fields(),
        "candidates": result.records(),
        "took_ms": _took_ms(t0),
    }


@retrieval.post("/candidates")
async def history_candidates(body: HistoryRequest, retriever: ReadyRetriever, state: State) -> HistoryCandidates:
    t0 = time.perf_counter()
    result = retriever.for_history(body.item_ids, body.k, **_merge_kwargs(retriever, body.merge, body.diversity))
    return {
        "k": body.k,
        "model": state.summary,
        **result.response_fields(),
        "candidates": result.records(),
        "unknown_item_ids": result.unknown_item_ids,
        "took_ms": _took_ms(t0),
    }


@retrieval.get("/users/{user_id}/candidates/{item_id}/explain")
async def explain(
    user_id: str,
    item_id: str,
    retriever: ReadyRetriever,
    state: State,
    max_paths: int = Query(5, ge=1, le=50),
) -> Explanation:
    t0 = time.perf_counter()
    payload = retriever.explain(user_id, item_id, max_paths)
    return {**payload, "model": state.summary, "took_ms": _took_ms(t0)}


@retrieval.get("/model", dependencies=[Depends(ready_retriever)])
async def model(state: State) -> ModelInfo:
    return state.info


# `async def` like the other handlers: one 200-pair KCAN forward (~4 ms on one thread) costs
# less on the event loop than the threadpool hop plus per-thread torch setup (measured: p99
# 11.2 -> 9.3 ms, benchmarks/two_stage_latency.py). Scale throughput with uvicorn workers.
@two_stage.get("/users/{user_id}/ranked")
async def ranked(
    user_id: str,
    service: ReadyTwoStage,
    state: State,
    k: int = Query(20, ge=1, le=MAX_K),
    n: int | None = Query(None, ge=1, le=MAX_K, description="candidates retrieved (default: the ranker's)"),
) -> RankedCandidates:
    result = service.for_user(user_id, k, n)
    return {
        "user_id": user_id,
        "k": k,
        "n": result.num_candidates,
        "model": state.summary,
        "ranker": state.ranker_summary,
        "candidates": result.records(),
        "timings_ms": result.timings_ms,
    }


@two_stage.get("/latency")
async def latency(service: ReadyTwoStage) -> LatencyReport:
    return {"two_stage": service.latency.summary()}


# ---------------------------------------------------------------------------- errors
async def _candidate_error(request: Request, exc: CandidateError) -> JSONResponse:
    return JSONResponse({"detail": exc.message}, status_code=exc.status_code)


async def _unavailable(request: Request, exc: ServiceUnavailable) -> JSONResponse:
    return JSONResponse({"detail": exc.message}, status_code=503)


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = []
    for e in exc.errors():
        loc_parts = list(e.get("loc", ()))
        msg = str(e.get("msg", ""))
        if e.get("type") == "json_invalid":
            pos = loc_parts[1] if len(loc_parts) > 1 else "?"
            loc_parts = loc_parts[:1]
            cause = (e.get("ctx") or {}).get("error")
            msg = f"malformed JSON body at character {pos}" + (f": {cause}" if cause else "")
        loc = ".".join(str(p) for p in loc_parts)
        errors.append({"loc": loc, "msg": msg, "type": str(e.get("type", ""))})
    message = "; ".join(f"{e['loc']}: {e['msg']}" for e in errors) or "invalid request"
    return JSONResponse({"detail": message, "errors": errors}, status_code=422)


# ---------------------------------------------------------------------------- app
@asynccontextmanager
async def _lifespan(app: FastAPI, *, load_service: Loader, load_ranker: RankerLoader | None):
    state: ServingState = app.state.kgrec
    state.load(load_service, load_ranker)
    yield
    state.unload()


def create_app(load_service: Loader, load_ranker: RankerLoader | None = None) -> FastAPI:
    app = FastAPI(
        title="kgrec candidates",
        lifespan=partial(_lifespan, load_service=load_service, load_ranker=load_ranker),
        exception_handlers={
            CandidateError: _candidate_error,
            ServiceUnavailable: _unavailable,
            RequestValidationError: _invalid,
        },
    )
    app.state.kgrec = ServingState()
    for router in (retrieval, two_stage, health):  # matched in this order: the hot routes first
        app.include_router(router)
    return app


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


def run(
    host: str,
    port: int,
    load_service: Loader,
    log_level: str = "warning",
    load_ranker: RankerLoader | None = None,
    **uvicorn_kwargs: Any,
) -> None:
    """Serve ``create_app(load_service, load_ranker)`` with uvicorn (access log off: it costs latency)."""
    import uvicorn

    uvicorn_kwargs.setdefault("access_log", False)
    app = create_app(load_service, load_ranker)
    uvicorn.run(app, host=host, port=port, log_level=log_level, **uvicorn_kwargs)
