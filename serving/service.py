"""FastAPI candidates service.

``create_app(load_service)`` builds the app; ``load_service()`` runs once at startup (lifespan) and
returns ``(service, model_info)``, the service being a ``CandidateService`` (embedding retriever)
or a ``MultiInterestService`` (multi-interest retriever, :mod:`kgrec.serving.multi_interest`).
``model_info`` is free-form JSON describing what is served; the keys the pipeline uses are ``name`` (registered model name), ``version``, ``alias``,
``run_id``, ``model``, ``dataset``. A loader that raises leaves the process up: ``/healthz`` stays
200, ``/readyz`` answers 503 with the error, and the candidate endpoints answer 503.

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
``merge`` and ``interest_weights`` (and ``diversity`` for the controllable merge). Embedding
retrievers ignore ``merge`` and ``diversity``.

Errors are always 4xx JSON ``{"detail": ...}``: unknown user 404, bad ``k`` / ``n`` / ``merge`` / body
422, all posted items unknown 422, model (or ranker) not loaded 503.

Latency: the candidate handlers are ``async def`` on purpose. One request is ~0.2 ms of CPU
(faiss search + id mapping) with faiss pinned to one OpenMP thread; hopping to the threadpool
would cost about as much again. Responses are serialised with orjson straight into a ``Response``
(no response-model validation, no ``jsonable_encoder``). Scale throughput with uvicorn workers.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import orjson
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from kgrec.serving.candidates import CandidateError, CandidateService
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from kgrec.serving.multi_interest import MultiInterestService
    from kgrec.serving.ranking import RankerBundle, TwoStageService

log = logging.getLogger(__name__)

MAX_K = 1000
MAX_HISTORY = 500

Loader = Callable[[], "tuple[CandidateService | MultiInterestService, dict[str, Any]]"]
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


class ServiceUnavailable(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def _json(payload: Any, status_code: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status_code, media_type="application/json")


def _summary(info: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": info.get("name", info.get("registered_name")),
        "version": info.get("version"),
    }


class _State:
    def __init__(self) -> None:
        self.service: CandidateService | MultiInterestService | None = None
        self.info: dict[str, Any] = {}
        self.summary: dict[str, Any] = {}
        self.error: str | None = "model not loaded yet"
        self.two_stage: TwoStageService | None = None

    def require(self) -> CandidateService | MultiInterestService:
        if self.service is None:
            raise ServiceUnavailable(f"model not loaded: {self.error}")
        return self.service

    def require_two_stage(self) -> TwoStageService:
        self.require()
        if self.two_stage is None:
            raise ServiceUnavailable(
                "no ranking model loaded: register one with `kgrec pipeline --ranker kcan` and "
                "restart the service"
            )
        return self.two_stage


def _is_service(service: Any) -> bool:
    if isinstance(service, CandidateService):
        return True
    from kgrec.serving.multi_interest import MultiInterestService

    return isinstance(service, MultiInterestService)


def _merge_kwargs(service: Any, merge: str | None, diversity: float | None) -> dict[str, Any]:
    if not getattr(service, "supports_merge", False):
        return {}
    return {key: value for key, value in (("merge", merge), ("diversity", diversity)) if value is not None}


def create_app(load_service: Loader, load_ranker: RankerLoader | None = None) -> FastAPI:
    state = _State()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        t0 = time.perf_counter()
        try:
            service, info = load_service()
            if not _is_service(service):
                raise TypeError(
                    f"loader returned {type(service).__name__}, expected CandidateService or "
                    "MultiInterestService"
                )
            state.info = {
                **dict(info or {}),
                **(service.info() if hasattr(service, "info") else {"kind": "embedding"}),
                "index_kind": service.index_kind,
                "n_items": service.n_items,
                "n_users": service.n_users,
            }
            state.summary = _summary(state.info)
            ranker = load_ranker() if load_ranker is not None else None
            if ranker is not None:
                from kgrec.serving.ranking import TwoStageService

                bundle, ranker_info = ranker
                state.two_stage = TwoStageService(service, bundle)
                state.info["ranker"] = {**dict(ranker_info or {}), **state.two_stage.info()}
            state.service, state.error = service, None
            # the loaded model is long-lived: keep its objects out of the collector's scans so
            # generation-2 collections do not show up in the latency tail
            gc.collect()
            gc.freeze()
            log.info("model loaded in %.2fs: %s", time.perf_counter() - t0, state.summary)
        except Exception as exc:  # keep serving /healthz and report on /readyz
            state.error = f"{type(exc).__name__}: {exc}"
            log.exception("model load failed")
        yield
        state.service = state.two_stage = None

    app = FastAPI(title="kgrec candidates", lifespan=lifespan)
    app.state.kgrec = state

    @app.exception_handler(CandidateError)
    async def _candidate_error(request: Request, exc: CandidateError) -> Response:
        return _json({"detail": exc.message}, exc.status_code)

    @app.exception_handler(ServiceUnavailable)
    async def _unavailable(request: Request, exc: ServiceUnavailable) -> Response:
        return _json({"detail": exc.message}, 503)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
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
        return _json({"detail": message, "errors": errors}, 422)

    @app.get("/healthz")
    async def healthz() -> Response:
        return _json({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        if state.service is None:
            return _json({"status": "unavailable", "detail": state.error}, 503)
        return _json({"status": "ready", "model": state.info})

    @app.get("/v1/model")
    async def model() -> Response:
        state.require()
        return _json(state.info)

    @app.get("/v1/users/{user_id}/candidates")
    async def user_candidates(
        user_id: str,
        k: int = Query(100, ge=1, le=MAX_K),
        merge: MergeParam | None = Query(None),
        diversity: float | None = Query(None, ge=0.0, le=MAX_DIVERSITY),
    ) -> Response:
        t0 = time.perf_counter()
        service = state.require()
        result = service.for_user(user_id, k, **_merge_kwargs(service, merge, diversity))
        return _json(
            {
                "user_id": user_id,
                "k": k,
                "model": state.summary,
                **result.response_fields(),
                "candidates": result.records(),
                "took_ms": round((time.perf_counter() - t0) * 1e3, 3),
            }
        )

    @app.get("/v1/users/{user_id}/candidates/{item_id}/explain")
    async def explain(
        user_id: str, item_id: str, max_paths: int = Query(5, ge=1, le=50)
    ) -> Response:
        t0 = time.perf_counter()
        payload = state.require().explain(user_id, item_id, max_paths)
        payload["model"] = state.summary
        payload["took_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
        return _json(payload)

    # `async def` like the other handlers: one 200-pair KCAN forward (~4 ms on one thread) costs
    # less on the event loop than the threadpool hop plus per-thread torch setup (measured: p99
    # 11.2 -> 9.3 ms, benchmarks/two_stage_latency.py). Scale throughput with uvicorn workers.
    @app.get("/v1/users/{user_id}/ranked")
    async def ranked(
        user_id: str,
        k: int = Query(20, ge=1, le=MAX_K),
        n: int | None = Query(None, ge=1, le=MAX_K, description="candidates retrieved (default: the ranker's)"),
    ) -> Response:
        two_stage = state.require_two_stage()
        result = two_stage.for_user(user_id, k, n)
        return _json(
            {
                "user_id": user_id,
                "k": k,
                "n": result.num_candidates,
                "model": state.summary,
                "ranker": _summary(state.info.get("ranker", {})),
                "candidates": result.records(),
                "timings_ms": result.timings_ms,
            }
        )

    @app.get("/v1/latency")
    async def latency() -> Response:
        return _json({"two_stage": state.require_two_stage().latency.summary()})

    @app.post("/v1/candidates")
    async def history_candidates(body: HistoryRequest) -> Response:
        t0 = time.perf_counter()
        service = state.require()
        result = service.for_history(body.item_ids, body.k, **_merge_kwargs(service, body.merge, body.diversity))
        return _json(
            {
                "k": body.k,
                "model": state.summary,
                **result.response_fields(),
                "candidates": result.records(),
                "unknown_item_ids": result.unknown_item_ids,
                "took_ms": round((time.perf_counter() - t0) * 1e3, 3),
            }
        )

    return app


def bundle_loader(directory: str | Path, info: dict[str, Any] | None = None) -> Loader:
    """Loader for a bundle directory of either kind; uses ``<directory>/index`` when present, else
    builds one."""

    def load() -> tuple[CandidateService | MultiInterestService, dict[str, Any]]:
        from kgrec.serving.bundle import INDEX_DIRNAME
        from kgrec.serving.champion import open_service
        from kgrec.serving.index import load_index

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
