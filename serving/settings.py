"""Typed configuration of ``kgrec serve`` (:class:`ServeSettings`), validated at the edge.

The parent process validates the command line into one ``ServeSettings``; under ``--workers N``
each uvicorn worker rebuilds the app from the same settings, passed as JSON in
``$KGREC_SERVE_SETTINGS`` (:func:`kgrec.serving.service.app_from_env`). The bearer token is never
part of the settings: it comes from ``$KGREC_SERVE_TOKEN`` or from ``token_file`` (read by every
process), so it does not end up in logs or in the JSON.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Literal

from kgrec.models.tracking.settings import TrackingSettings
from pydantic import BaseModel, ConfigDict, Field, model_validator

SETTINGS_ENV = "KGREC_SERVE_SETTINGS"
TOKEN_ENV = "KGREC_SERVE_TOKEN"
#: Longest user or item id a request may carry; longer ones are a 422.
MAX_ID_LENGTH = 256
#: A POST body of 500 ids of 256 characters is ~135 KB; 1 MiB leaves room without parsing 50 MB.
DEFAULT_MAX_BODY_BYTES = 1 << 20
#: Facts one posted item (POST /v1/items) may carry; the most-described ml-100k movie has 242.
DEFAULT_MAX_ITEM_FACTS = 256


def cpu_quota() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 ``cpu.max`` quota
    (a container limited to 2 CPUs on a 64-core host gets 2, not 64)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ServeSettings(BaseModel):
    """Everything one ``kgrec serve`` needs (see ``kgrec serve --help`` for each option)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tracking: TrackingSettings = Field(default_factory=TrackingSettings)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=64)
    model_name: str = Field(min_length=1)
    alias: str = "champion"
    #: None: the default ranker name of ``model_name`` (optional); a name: a ranker that must load.
    ranker_name: str | None = None
    ranker_alias: str = "champion"
    no_ranker: bool = False
    #: Seconds between registry polls for a new version of the alias; 0 = no polling.
    poll_interval_s: float = Field(30.0, ge=0)
    token_file: Path | None = None
    #: Origins allowed by CORS; empty = no CORS headers at all.
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, ge=1024)
    fail_fast: bool = False
    #: Where registered versions are cached (default: the serve cache of the work directory); the
    #: overlays of posted items live there too (``<cache>/<model>/overlays/``).
    cache_dir: Path | None = None
    #: Facts a posted item may carry (more: 422).
    max_item_facts: int = Field(DEFAULT_MAX_ITEM_FACTS, ge=1, le=100_000)
    #: Candidate slots reserved for posted items when a request does not set ``fresh`` (0: posted
    #: items compete with the catalogue on score alone; see kgrec.serving.candidates).
    fresh_slots: int = Field(0, ge=0, le=1000)
    #: Seconds between checks (one stat) of the served version's overlay for items other workers
    #: posted; 0 = never (a worker then sees them at its next post or reload).
    overlay_poll_interval_s: float = Field(1.0, ge=0)
    access_log: bool = True
    log_format: Literal["json", "text"] = "json"
    log_level: str = "info"
    #: torch and faiss threads per worker (default: the CPU quota divided among the workers).
    threads: int | None = Field(None, ge=1)
    #: uvicorn's event loop. asyncio, not uvloop, by default: with uvloop (and httptools) ~1 % of the
    #: answers waited 1-2 s once a worker held 64 busy keep-alive connections (p99 0.7-1.2 s against
    #: 0.08-0.11 s on asyncio's loop, benchmarks/serve_scale.py at 1M items), for ~5-10 % less CPU.
    #: The HTTP parser is uvicorn's choice: httptools when installed (~0.15 ms less CPU a request
    #: than h11).
    loop: Literal["asyncio", "uvloop", "auto"] = "asyncio"

    @model_validator(mode="after")
    def _beyond_loopback_needs_token(self) -> ServeSettings:
        if not is_loopback(self.host) and not self.token():
            raise ValueError(
                f"binding {self.host} (beyond loopback) needs a bearer token: set ${TOKEN_ENV} or --token-file"
            )
        return self

    @property
    def serve_cache_dir(self) -> Path:
        """The serve cache root: ``cache_dir``, else ``<workdir>/serve-cache``."""
        return self.cache_dir or self.tracking.workdir / "serve-cache"

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    @property
    def threads_per_worker(self) -> int:
        """N workers x threads <= the CPU quota."""
        return self.threads or max(1, cpu_quota() // self.workers)

    def token(self) -> str | None:
        """The bearer token: ``$KGREC_SERVE_TOKEN``, else the first line of ``token_file``."""
        if os.environ.get(TOKEN_ENV):
            return os.environ[TOKEN_ENV].strip() or None
        if self.token_file is not None:
            try:
                return self.token_file.read_text(encoding="utf-8").strip().splitlines()[0].strip() or None
            except (OSError, IndexError) as exc:
                raise ValueError(f"cannot read the token file {self.token_file}: {exc}") from exc
        return None
