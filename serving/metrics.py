"""Prometheus metrics of the candidates service (``GET /metrics``), with ``prometheus_client``.

One :class:`ServiceMetrics` per app, on its own :class:`~prometheus_client.CollectorRegistry` (so
several apps in one process, as in the tests, do not collide in the global registry). Under
``kgrec serve --workers N`` every worker writes its samples to ``$PROMETHEUS_MULTIPROC_DIR`` (set by
the parent before the workers start) and ``/metrics`` aggregates all workers with
:class:`~prometheus_client.multiprocess.MultiProcessCollector`, whichever worker answers.

Series (all prefixed ``kgrec_``):

* ``http_request_duration_seconds{endpoint,method}`` histogram and ``http_requests_total{endpoint,
  method,status}`` counter; ``endpoint`` is the route template (``/v1/users/{user_id}/candidates``),
  ``unmatched`` for a path no route knows (bounded label cardinality).
* ``http_requests_in_flight`` gauge.
* ``stage_duration_seconds{stage}`` histogram: ``retrieve`` (index search), ``merge`` (multi-interest
  merge), ``rerank`` (ranking model), ``explain``.
* ``model_info{role,name,version,kind,index_type}`` = 1 for what is served (0 for what was),
  ``index_size{role}`` (vectors), ``model_ready``.
* ``model_reloads_total{result}`` (``success`` | ``failure``), ``model_reload_last_failure_timestamp``.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.utils import floatToGoString

#: Request latency buckets (seconds): the service answers in 0.2-10 ms; the tail goes to 2.5 s.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5)
STAGES = ("retrieve", "merge", "rerank", "explain")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess() -> bool:
    """Whether samples go to the shared multi-process directory (``--workers`` > 1)."""
    return bool(os.environ.get(MULTIPROC_ENV))


class ServiceMetrics:
    """The service's metric objects and their exposition."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.request_seconds = Histogram(
            "kgrec_http_request_duration_seconds", "Request latency by endpoint (route template)",
            ["endpoint", "method"], buckets=LATENCY_BUCKETS, registry=reg,
        )
        self.requests = Counter(
            "kgrec_http_requests", "Requests by endpoint and status code", ["endpoint", "method", "status"],
            registry=reg,
        )
        self.in_flight = Gauge(
            "kgrec_http_requests_in_flight", "Requests being answered", registry=reg, multiprocess_mode="livesum",
        )
        self.stage_seconds = Histogram(
            "kgrec_stage_duration_seconds", "Time per serving stage", ["stage"], buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.model_info = Gauge(
            "kgrec_model_info", "What is served (1) and what was (0)",
            ["role", "name", "version", "kind", "index_type"], registry=reg, multiprocess_mode="liveall",
        )
        self.index_size = Gauge(
            "kgrec_index_size", "Vectors in the served index", ["role"], registry=reg, multiprocess_mode="liveall",
        )
        self.ready = Gauge("kgrec_model_ready", "1 when a model is served", registry=reg,
                           multiprocess_mode="liveall")
        self.reloads = Counter("kgrec_model_reloads", "Model reloads by result", ["result"], registry=reg)
        self.last_reload_failure = Gauge(
            "kgrec_model_reload_last_failure_timestamp_seconds", "When a reload last failed (Unix time)",
            registry=reg, multiprocess_mode="max",
        )
        for stage in STAGES:  # every stage's series exists from the start (rate() needs a zero)
            self.stage_seconds.labels(stage)
        for result in ("success", "failure"):
            self.reloads.labels(result)
        self._served: dict[str, tuple[str, ...]] = {}

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage_seconds.labels(stage).observe(seconds)

    def set_served(self, role: str, info: dict[str, Any] | None) -> None:
        """Mark ``info`` (``name``, ``version``, ``kind``, ``index_kind``, ``n_items``) as the served
        model of ``role`` (``retriever`` | ``ranker``); ``None`` = nothing served in that role."""
        old = self._served.pop(role, None)
        if old is not None:
            self.model_info.labels(*old).set(0)
        if info is None:
            return
        labels = (role, str(info.get("name") or ""), str(info.get("version") or ""),
                  str(info.get("kind") or info.get("model") or ""), str(info.get("index_kind") or ""))
        self.model_info.labels(*labels).set(1)
        self._served[role] = labels
        if info.get("n_items") is not None:
            self.index_size.labels(role).set(int(info["n_items"]))

    def stage_quantiles(self, stage: str) -> dict[str, Any]:
        return self.quantiles("kgrec_stage_duration_seconds", {"stage": stage})

    def quantiles(self, metric: str, labels: dict[str, str],
                  quantiles: tuple[float, ...] = (0.5, 0.9, 0.99)) -> dict[str, Any]:
        """``{"n", "p50_ms", ..., "mean_ms"}`` of this process' histogram ``metric`` at ``labels``
        (linear within a bucket, as PromQL's ``histogram_quantile``): the data behind ``/v1/latency``."""
        get = self.registry.get_sample_value
        buckets = [(bound, get(f"{metric}_bucket", {**labels, "le": floatToGoString(bound)}) or 0.0)
                   for bound in (*LATENCY_BUCKETS, float("inf"))]
        total = buckets[-1][1]
        out: dict[str, Any] = {"n": int(total)}
        if not total:
            return out
        for q in quantiles:
            rank, lower, below = q * total, 0.0, 0.0
            for upper, cumulative in buckets:
                if cumulative >= rank:
                    if upper == float("inf"):
                        value = lower  # beyond the last finite bucket: its bound, as PromQL does
                    else:
                        inside = cumulative - below
                        value = lower + (upper - lower) * ((rank - below) / inside if inside else 1.0)
                    out[f"p{round(q * 100):d}_ms"] = round(value * 1e3, 3)
                    break
                lower, below = upper, cumulative
        out["mean_ms"] = round((get(f"{metric}_sum", labels) or 0.0) / total * 1e3, 3)
        return out

    def render(self) -> tuple[bytes, str]:
        """The exposition text (all workers' samples under ``--workers``) and its content type."""
        if multiprocess():
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
