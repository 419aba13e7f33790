"""The whole pipeline at scale: ingest → train (LightGCN, KGAT) → register → index → serve.

One prepared command for the issue-16 question "does the pipeline run end to end at 10M
interactions on one 2-core, 24 GB machine, and what does each stage cost?":

1. **Generate** (a child process, timed apart: not a pipeline stage) a power-law dataset with the
   project's generator (:func:`kgrec.features.synthetic.powerlaw_snapshot`): ``--interactions``
   (10M) distinct user-item pairs, ``--items`` (500k) items, ``--users`` users (default
   interactions / 50), as many KG entities as items, interactions / 2 triples over 30 relations;
   written as TSV files (interactions ``user, item, weight, timestamp``; item → entity links; KG
   ``head, relation, tail``) with a dataset spec YAML (absolute paths) in the work directory.
2. Run ``kgrec pipeline --dataset SPEC --models lightgcn,kgat --epochs 1 --parallel 1 --json`` as
   ONE child process with pinned threads (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``,
   ``POLARS_MAX_THREADS`` = ``--threads``), sample the RSS of it and of its children (Prefect's
   temporary server) from ``/proc`` every 0.25 s, timestamp every stderr line on arrival and cut the
   run into stages at its log lines (Prefect's ``Task run '...' - Finished in state ...`` of each
   task, the flow's ``training <model> on`` lines): start-up (imports, Prefect's temporary server),
   ingest, snapshot load + split, train per model (one epoch and its full-ranking validation),
   then per model test evaluation, register (bundle export, run plots, MLflow model), index
   build/publish and promote, and the flow's end. ``--parallel 1`` keeps training sequential so
   that the stages do not overlap.
3. Start ``kgrec serve`` on the registered model (a free loopback port, no registry polling), time
   until ``GET /readyz`` answers 200, record its RSS, send ``--requests`` (200) sequential
   ``GET /v1/users/{id}/candidates?k=100`` for known users of the snapshot over one keep-alive
   connection, report p50/p99 and errors, and stop it with SIGTERM.
4. Print a table (stage, wall s, CPU s of the pipeline process, peak RSS of it and of it with its
   children; a train stage also split into its epoch, from the epoch line, and validation + setup)
   and, last, one JSON line with every figure. CPU s next to wall s tells a busy machine from a
   slow stage (the load average is printed too).

Reading the stages: ``register`` exports the bundle, logs the run's plots and the MLflow model;
its popularity-bias plot opens the bundle's service, which builds a default index of its own, so
above ``IndexConfig.exact_threshold`` items (50k) the register stage holds a second index build.

Evaluation is full ranking: every user with a held-out item is scored against every item, for
validation after each epoch and for the test split (``kgrec.models.evaluation.evaluate``); the
pipeline has no option to evaluate a sample of users, so at scale ``--users`` (fewer users) is the
only way to make it cheaper here.

Everything goes to a fresh temporary directory (under ``--workdir`` if given, never the
repository), removed at the end unless ``--keep``. Any failed stage (a non-zero exit, a missing
stage line, a service that does not come up, a failed request, a service that does not stop on
SIGTERM) exits 1 with the tail of the child's stderr; the children's logs are then kept.

    .venv/bin/python benchmarks/pipeline_scale.py [--interactions 10000000] [--items 500000]
        [--users N] [--threads 2] [--workdir DIR] [--keep] [--skip-serve] [--requests 200]
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MODELS = ("lightgcn", "kgat")
SAMPLE_S = 0.25
GB = 1 << 30
PAGE = os.sysconf("SC_PAGE_SIZE")
TAIL_LINES = 60


# ----------------------------------------------------------------------------- generation
def generate(root: Path, interactions: int, items: int, users: int, seed: int = 2020) -> dict[str, Any]:
    """Write interactions.tsv, item_links.tsv, kg.tsv and spec.yaml under ``root`` (runs in the
    generator child: ``--_generate``)."""
    import numpy as np
    import polars as pl
    from kgrec.features.synthetic import PowerLawConfig, powerlaw_snapshot

    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    config = PowerLawConfig(
        num_users=users, num_items=items, num_interactions=interactions, num_entities=items,
        num_triples=interactions // 2, num_relations=30, seed=seed,
    )
    snapshot = powerlaw_snapshot(config)
    drawn_s = time.perf_counter() - t0
    rng = np.random.default_rng(seed + 1)
    inter = snapshot.interactions
    n = inter.height
    inter.select(
        (pl.lit("u") + pl.col("user_idx").cast(pl.String)).alias("user"),
        (pl.lit("i") + pl.col("item_idx").cast(pl.String)).alias("item"),
        pl.Series("weight", rng.integers(1, 6, n, dtype=np.int8)),
        pl.Series("timestamp", rng.integers(1_500_000_000, 1_700_000_000, n)),
    ).write_csv(root / "interactions.tsv", separator="\t")
    del inter
    idx = pl.Series(np.arange(items, dtype=np.int32)).cast(pl.String)
    pl.DataFrame({"item": "i" + idx, "entity": "ei" + idx}).write_csv(root / "item_links.tsv", separator="\t")

    # KG node space of the generator: items [0, items) -> their linked entity "ei<k>", other
    # entities [items, items + entities) -> "e<k>".
    def node(col: str) -> pl.Expr:
        c = pl.col(col)
        return (
            pl.when(c < items).then(pl.lit("ei") + c.cast(pl.String))
            .otherwise(pl.lit("e") + (c - items).cast(pl.String)).alias(col)
        )

    snapshot.kg.select(
        node("head"), (pl.lit("r") + pl.col("relation").cast(pl.String)).alias("relation"), node("tail")
    ).write_csv(root / "kg.tsv", separator="\t")
    spec = f"""# generated by benchmarks/pipeline_scale.py ({interactions} interactions, {items} items, {users} users)
name: pipeline-scale
interactions:
  path: {root / "interactions.tsv"}
  format: tsv
  user: user
  item: item
  weight: weight
  timestamp: timestamp
positive: any
item_links:
  path: {root / "item_links.tsv"}
  format: tsv
  item: item
  entity: entity
kg:
  path: {root / "kg.tsv"}
  format: tsv
  head: head
  relation: relation
  tail: tail
restrict_to_linked_items: true
"""
    (root / "spec.yaml").write_text(spec)
    files = ("interactions.tsv", "item_links.tsv", "kg.tsv")
    return {
        "interactions": n, "triples": snapshot.kg.height, "users": users, "items": items,
        "entities": items, "relations": 30, "draw_s": round(drawn_s, 2),
        "bytes": sum((root / f).stat().st_size for f in files), "spec": str(root / "spec.yaml"),
    }


# ----------------------------------------------------------------------------- child processes
TICK = os.sysconf("SC_CLK_TCK")


def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds (user + system)) of every process."""
    table: dict[int, tuple[int, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rfind(b")") + 2 :].split()  # fields from the 3rd (state) on
        table[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK)
    return table


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def tree_usage(root: int) -> dict[str, float]:
    """RSS (bytes) and CPU seconds of ``root`` (``main_*``) and of it with all its descendants
    (``tree_*``), and the number of processes. The RSS sum counts pages shared between processes
    once per process."""
    table = _proc_table()
    kids: dict[int, list[int]] = defaultdict(list)
    for pid, (ppid, _) in table.items():
        kids[ppid].append(pid)
    out = {"main_rss": _rss(root), "main_cpu": table.get(root, (0, 0.0))[1], "tree_rss": 0, "tree_cpu": 0.0,
           "procs": 0}
    stack = [root] if root in table else []
    while stack:
        pid = stack.pop()
        out["tree_rss"] += _rss(pid)
        out["tree_cpu"] += table.get(pid, (0, 0.0))[1]
        out["procs"] += 1
        stack.extend(kids.get(pid, ()))
    return out


def tree_rss(root: int) -> int:
    return int(tree_usage(root)["tree_rss"])


class RssSampler(threading.Thread):
    """Samples :func:`tree_usage` of ``pid`` every :data:`SAMPLE_S` seconds (times relative to
    ``t0``)."""

    def __init__(self, pid: int, t0: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.t0 = pid, t0
        self.times: list[float] = []
        self.samples: list[dict[str, float]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            usage = tree_usage(self.pid)
            if usage["procs"] and usage["main_rss"]:
                self.times.append(time.monotonic() - self.t0)
                self.samples.append(usage)
            self._stop_event.wait(SAMPLE_S)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)

    def max(self, key: str) -> float:
        return max((u[key] for u in self.samples), default=0)

    def peak(self, start: float, end: float) -> tuple[int, int]:
        """Peak (main, tree) RSS of the samples in ``[start, end]``; a window shorter than the
        sampling interval gets its neighbouring samples."""
        lo = bisect.bisect_left(self.times, start)
        hi = bisect.bisect_right(self.times, end)
        if hi <= lo:
            lo, hi = max(0, lo - 1), min(len(self.times), lo + 1)
        if hi <= lo:
            return 0, 0
        window = self.samples[lo:hi]
        return int(max(u["main_rss"] for u in window)), int(max(u["tree_rss"] for u in window))

    def cpu(self, start: float, end: float, key: str = "main_cpu") -> float:
        """CPU seconds (user + system) between the last samples at ``start`` and at ``end``."""
        def at(t: float) -> float:
            i = bisect.bisect_right(self.times, t) - 1
            return self.samples[i][key] if i >= 0 else 0.0
        return max(0.0, at(end) - at(start))


@dataclass
class Child:
    """A child process whose stdout and stderr lines are read by threads, each stderr line with
    its arrival time (seconds since the launch); the stderr also goes to ``log``."""

    argv: list[str]
    env: dict[str, str]
    log: Path
    t0: float = 0.0
    proc: subprocess.Popen | None = None
    stderr: list[tuple[float, str]] = field(default_factory=list)
    stdout: list[str] = field(default_factory=list)
    returncode: int | None = None
    maxrss: int = 0
    cpu_s: float = 0.0
    wall_s: float = 0.0

    def start(self) -> Child:
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env,
            stdin=subprocess.DEVNULL, cwd=self.log.parent,
        )
        self._threads = [
            threading.Thread(target=self._read_err, daemon=True),
            threading.Thread(target=self._read_out, daemon=True),
        ]
        for t in self._threads:
            t.start()
        return self

    def _read_err(self) -> None:
        with open(self.log, "w", encoding="utf-8") as out:
            for raw in self.proc.stderr:
                now = time.monotonic() - self.t0
                line = raw.decode("utf-8", "replace").rstrip("\n")
                self.stderr.append((now, line))
                out.write(f"{now:10.3f} {line}\n")
                out.flush()

    def _read_out(self) -> None:
        for raw in self.proc.stdout:
            self.stdout.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait (``wait4``: the child's own peak RSS) and drain its pipes; ``None`` if it is still
        running after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(self.proc.pid, 0 if deadline is None else os.WNOHANG)
            if pid:
                break
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.1)
        self.wall_s = time.monotonic() - self.t0
        self.returncode = self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.maxrss = usage.ru_maxrss * 1024
        self.cpu_s = usage.ru_utime + usage.ru_stime  # with its reaped children's
        for t in self._threads:
            t.join(timeout=30)
        return self.returncode

    def tail(self, n: int = TAIL_LINES) -> str:
        return "\n".join(line for _, line in self.stderr[-n:])

    def json_result(self) -> dict[str, Any] | None:
        for line in reversed(self.stdout):
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    return json.loads(line)
        return None


class BenchmarkFailed(SystemExit):
    def __init__(self, message: str, child: Child | None = None) -> None:
        text = f"pipeline_scale: FAILED: {message}"
        if child is not None:
            text += f"\n--- last {TAIL_LINES} stderr lines of {' '.join(child.argv[:3])} ... ({child.log}) ---\n"
            text += child.tail()
        print(text, file=sys.stderr, flush=True)
        super().__init__(1)


# ----------------------------------------------------------------------------- stages
TASK_DONE = re.compile(r"Task run '(?P<name>[^']+)' - Finished in state (?P<state>\w+)")
FLOW_BEGIN = re.compile(r"Beginning flow run")
FLOW_DONE = re.compile(r"Flow run '[^']+' - Finished in state (?P<state>\w+)")
TRAINING = re.compile(r"training (?P<model>\w+) on ")
EPOCH = re.compile(r"kgrec\.models\S*\s*[-:] epoch (?P<epoch>\d+) loss=\S+ (?P<seconds>[\d.]+)s")
STEPS = ("evaluate", "register", "publish-index", "promote")
STEP_LABEL = {"evaluate": "test evaluation", "register": "register", "publish-index": "index build+publish",
              "promote": "promote"}


def task_kind(name: str) -> tuple[str, str | None]:
    """``'train-kgat' -> ('train', 'kgat')``, ``'register-aa3' -> ('register', None)``."""
    if name.startswith("train-"):
        return "train", name[len("train-"):]
    base = re.sub(r"-[0-9a-f]+$", "", name)
    return base, None


def cut_stages(lines: list[tuple[float, str]], end_s: float, models: tuple[str, ...]) -> tuple[list[dict], dict]:
    """The pipeline's stages ``[{stage, start_s, end_s, wall_s}]`` from its timestamped stderr,
    plus the epoch lines per model; raises :class:`BenchmarkFailed` if a stage is missing or
    failed."""
    marks: list[tuple[str, float]] = []  # (label, time the stage ended)
    epochs: dict[str, list[dict]] = defaultdict(list)
    training_lines: list[float] = []
    step_count: dict[str, int] = defaultdict(int)
    current_train: list[str] = list(models)
    seen_begin = False
    problems = []
    for t, line in lines:
        if not seen_begin and FLOW_BEGIN.search(line):
            marks.append(("start-up (imports, Prefect server)", t))
            seen_begin = True
        elif m := TRAINING.search(line):
            training_lines.append(t)
            if len(training_lines) == 1:
                marks.append(("snapshot load", t))
        elif m := EPOCH.search(line):
            model = current_train[0] if current_train else "?"
            epochs[model].append({"epoch": int(m["epoch"]), "seconds": float(m["seconds"]), "at_s": t})
        elif m := TASK_DONE.search(line):
            kind, model = task_kind(m["name"])
            if m["state"] != "Completed":
                problems.append(f"task {m['name']} finished in state {m['state']}")
                continue
            if kind == "ingest":
                marks.append(("ingest", t))
            elif kind == "train":
                if training_lines and not any(label == "split + graph inputs" for label, _ in marks):
                    marks.append(("split + graph inputs", training_lines[-1]))
                marks.append((f"train {model} (1 epoch + validation)", t))
                if model in current_train:
                    current_train.remove(model)
            elif kind in STEPS:
                i = step_count[kind]
                step_count[kind] += 1
                who = models[i] if i < len(models) else f"#{i}"
                marks.append((f"{STEP_LABEL[kind]} {who}", t))
        elif m := FLOW_DONE.search(line):
            if m["state"] != "Completed":
                problems.append(f"flow finished in state {m['state']}")
            marks.append(("flow end (summary, artifacts)", t))
    marks.append(("exit (Prefect server stop)", end_s))
    expected = ["start-up (imports, Prefect server)", "ingest", "snapshot load", "split + graph inputs",
                *(f"train {m} (1 epoch + validation)" for m in models),
                *(f"{STEP_LABEL[s]} {m}" for m in models for s in STEPS),
                "flow end (summary, artifacts)"]
    found = [label for label, _ in marks]
    missing = [label for label in expected if label not in found]
    if problems or missing:
        raise BenchmarkFailed(
            "; ".join(problems + ([f"stages not found in the log: {missing}"] if missing else []))
        )
    stages, start = [], 0.0
    for label, t in marks:
        stages.append({"stage": label, "start_s": start, "end_s": t, "wall_s": t - start})
        start = t
    return stages, dict(epochs)


# ----------------------------------------------------------------------------- serving
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(conn: http.client.HTTPConnection, path: str) -> tuple[int, bytes]:
    conn.request("GET", path)
    response = conn.getresponse()
    return response.status, response.read()


def known_users(snapshot_dir: str | None, generated_users: int, n: int) -> list[str]:
    """``n`` user ids of the snapshot (spread over it, seeded); the generated ids if it cannot be
    read."""
    import numpy as np

    ids: list[str] | None = None
    if snapshot_dir:
        with contextlib.suppress(Exception):
            import polars as pl

            ids = pl.read_parquet(Path(snapshot_dir) / "users.parquet", columns=["user_id"])["user_id"].to_list()
    if not ids:
        ids = [f"u{i}" for i in range(generated_users)]
    rng = np.random.default_rng(0)
    return [ids[i] for i in rng.choice(len(ids), size=n, replace=len(ids) < n)]


def run_serve(kgrec: str, work: Path, model_name: str, users: list[str], env: dict[str, str],
              ready_timeout_s: float) -> dict[str, Any]:
    port = free_port()
    child = Child(
        [kgrec, "serve", "--workdir", str(work), "--model-name", model_name, "--port", str(port),
         "--poll-interval", "0", "--no-ranker", "--log-format", "text"],
        env, work / "serve.stderr.log",
    ).start()
    sampler = RssSampler(child.proc.pid, child.t0)
    sampler.start()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        ready_s = None
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            if child.wait(timeout=0) is not None:
                raise BenchmarkFailed(f"kgrec serve exited ({child.returncode}) before it was ready", child)
            try:
                status, _ = get(conn, "/readyz")
                if status == 200:
                    ready_s = time.monotonic() - child.t0
                    break
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            time.sleep(0.1)
        if ready_s is None:
            raise BenchmarkFailed(f"kgrec serve not ready within {ready_timeout_s:.0f} s", child)
        time.sleep(SAMPLE_S * 2)
        rss_ready = tree_rss(child.proc.pid)
        _, model_body = get(conn, "/v1/model")
        served = json.loads(model_body)
        latencies, errors, short, first_error = [], 0, 0, None
        req_start = time.monotonic() - child.t0
        for uid in users:
            t0 = time.perf_counter()
            try:
                status, body = get(conn, f"/v1/users/{uid}/candidates?k=100")
            except (OSError, http.client.HTTPException) as exc:
                status, body = -1, str(exc).encode()
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            latencies.append((time.perf_counter() - t0) * 1000)
            if status != 200:
                errors += 1
                first_error = first_error or f"{status}: {body[:200]!r}"
            elif len(json.loads(body).get("candidates", [])) != 100:
                short += 1
        req_end = time.monotonic() - child.t0
    finally:
        conn.close()
        killed, stop_t0 = False, time.monotonic()
        if child.returncode is None:  # not reaped yet: the pid is still the child's
            child.proc.send_signal(signal.SIGTERM)
            if child.wait(timeout=60) is None:
                killed = True
                child.proc.kill()
                child.wait()
        stop_s = time.monotonic() - stop_t0
        sampler.stop()
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(round(p / 100 * (len(latencies) - 1))))]

    result = {
        "port": port,
        "model": served.get("name") or served.get("model"), "version": served.get("version"),
        "model_info": {k: served.get(k) for k in ("name", "version", "alias", "kind", "run_id") if k in served},
        "ready_s": round(ready_s, 2),
        "rss_ready_gb": rss_ready / GB,
        "peak_rss_start_gb": sampler.peak(0, req_start)[1] / GB,
        "peak_rss_requests_gb": sampler.peak(req_start, req_end)[1] / GB,
        "cpu_start_s": round(sampler.cpu(0, ready_s), 2), "cpu_requests_s": round(sampler.cpu(req_start, req_end), 2),
        "requests": len(users), "errors": errors, "short_lists": short, "first_error": first_error,
        "p50_ms": round(pct(50), 2), "p99_ms": round(pct(99), 2), "max_ms": round(latencies[-1], 2),
        "requests_wall_s": round(req_end - req_start, 2),
        "exit_code": child.returncode,
        # uvicorn re-raises the SIGTERM it handled once it has shut down: -15 after its last line
        "stopped_cleanly": not killed and child.returncode in (0, -signal.SIGTERM)
        and any("Finished server process" in line for _, line in child.stderr[-20:]),
        "stop_s": round(stop_s, 2),
        "peak_rss_wait4_gb": child.maxrss / GB,
    }
    if errors:
        raise BenchmarkFailed(f"{errors} of {len(users)} retrieval requests failed (first: {first_error})", child)
    if not result["stopped_cleanly"]:
        raise BenchmarkFailed(f"kgrec serve did not stop cleanly on SIGTERM (exit {child.returncode})", child)
    return result


# ----------------------------------------------------------------------------- report
def index_files(work: Path) -> dict[str, dict[str, Any]]:
    """``index.json`` files under the work directory (MLflow artefacts, serve cache), by version."""
    out: dict[str, dict[str, Any]] = {}
    for path in work.rglob("index.json"):
        with contextlib.suppress(Exception):
            info = json.loads(path.read_text())
            if "kind" in info and "model_version" in info:
                out.setdefault(str(info["model_version"]), {**info, "path": str(path)})
    return out


def print_table(rows: list[dict[str, Any]]) -> None:
    width = max(len(r["stage"]) for r in rows)
    print(f"\n{'stage':<{width}}  {'wall s':>9}  {'CPU s':>9}  {'peak RSS GB':>11}  {'+children GB':>12}")
    print(f"{'-' * width}  {'-' * 9}  {'-' * 9}  {'-' * 11}  {'-' * 12}")

    def cell(value: float | None, digits: int) -> str:
        return "" if value is None else f"{value:.{digits}f}"

    for r in rows:
        print(f"{r['stage']:<{width}}  {r['wall_s']:>9.1f}  {cell(r.get('cpu_s'), 1):>9}  "
              f"{cell(r.get('peak_rss_gb'), 2):>11}  {cell(r.get('peak_rss_tree_gb'), 2):>12}")


def machine(threads: int) -> dict[str, Any]:
    mem = 0
    with contextlib.suppress(OSError, ValueError):
        mem = int(open("/proc/meminfo").readline().split()[1]) * 1024
    return {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "memory_gb": round(mem / GB, 1), "threads": threads}


def outside_repo(path: Path) -> Path:
    path = path.expanduser().resolve()
    if path == REPO or REPO in path.parents:
        raise SystemExit(f"--workdir {path} is inside the repository: choose a directory outside it")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interactions", type=int, default=10_000_000)
    parser.add_argument("--items", type=int, default=500_000)
    parser.add_argument("--users", type=int, help="users (default: interactions / 50); fewer users "
                        "make the full-ranking evaluation cheaper")
    parser.add_argument("--threads", type=int, default=2, help="OMP/MKL/POLARS threads of the children")
    parser.add_argument("--workdir", type=Path, help="the temporary directory goes under it (default: $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the data, snapshot, MLflow store and logs")
    parser.add_argument("--skip-serve", action="store_true", help="stop after the pipeline")
    parser.add_argument("--requests", type=int, default=200, help="sequential retrieval requests")
    parser.add_argument("--ready-timeout", type=float, default=900.0, help="seconds for kgrec serve to be ready")
    parser.add_argument("--kgrec", default=str(Path(sys.executable).with_name("kgrec")), help="the kgrec executable")
    parser.add_argument("--child-verbose", action="store_true", help="run kgrec pipeline with -v (tracebacks)")
    parser.add_argument("--_generate", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    users = args.users or max(1, args.interactions // 50)
    if args._generate:  # the generator child
        print(json.dumps(generate(args._generate, args.interactions, args.items, users)))
        return
    if args.interactions < 2 * users:
        raise SystemExit("--interactions must be at least 2 x users (every user has 2 interactions)")

    threads = str(args.threads)
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, POLARS_MAX_THREADS=threads,
               PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    for var in ("KGREC_TRACKING_URI", "MLFLOW_TRACKING_URI", "PREFECT_API_URL", "KGREC_TASK_RUNNER"):
        env.pop(var, None)  # the embedded store and Prefect's temporary server, threads
    parent = outside_repo(args.workdir) if args.workdir else None
    if parent:
        parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="kgrec-bench-pipeline-", dir=parent))
    outside_repo(work)
    env["PREFECT_HOME"] = str(work / "prefect")  # a Prefect database of its own (no other run's)
    print(f"pipeline_scale: {args.interactions:,} interactions, {args.items:,} items, {users:,} users; "
          f"threads {threads} (OMP_NUM_THREADS, MKL_NUM_THREADS, POLARS_MAX_THREADS); workdir {work}",
          file=sys.stderr, flush=True)
    started = time.monotonic()
    load_start = [round(x, 2) for x in os.getloadavg()]
    rows: list[dict[str, Any]] = []
    failed = True
    try:
        # 1. generation (own process: its memory is its own and is gone before the pipeline)
        gen = Child([sys.executable, str(Path(__file__).resolve()), "--_generate", str(work / "data"),
                     "--interactions", str(args.interactions), "--items", str(args.items), "--users", str(users)],
                    env, work / "generate.stderr.log").start()
        if gen.wait() != 0:
            raise BenchmarkFailed(f"generation failed ({gen.returncode})", gen)
        generated = gen.json_result() or {}
        generated |= {"wall_s": round(gen.wall_s, 2), "peak_rss_gb": gen.maxrss / GB}
        print(f"generated {generated['interactions']:,} interactions, {generated['triples']:,} triples "
              f"({generated['bytes'] / 1e6:.0f} MB of TSV) in {gen.wall_s:.1f} s", file=sys.stderr, flush=True)

        # 2. the pipeline, one child
        pipe_argv = [args.kgrec, *(["-v"] if args.child_verbose else []), "pipeline",
                     "--dataset", generated["spec"], "--models", ",".join(MODELS), "--epochs", "1",
                     "--parallel", "1", "--workdir", str(work), "--json"]
        pipe = Child(pipe_argv, env, work / "pipeline.stderr.log").start()
        sampler = RssSampler(pipe.proc.pid, pipe.t0)
        sampler.start()
        print(f"running: {' '.join(pipe_argv)}  (stderr: {pipe.log})", file=sys.stderr, flush=True)
        rc = pipe.wait()
        sampler.stop()
        if rc != 0:
            raise BenchmarkFailed(f"kgrec pipeline exited {rc} after {pipe.wall_s:.1f} s", pipe)
        result = pipe.json_result()
        if not result or result.get("status") == "failed":
            raise BenchmarkFailed("kgrec pipeline printed no result JSON", pipe)
        stages, epochs = cut_stages(pipe.stderr, pipe.wall_s, MODELS)
        for stage in stages:
            main_peak, tree_peak = sampler.peak(stage["start_s"], stage["end_s"])
            stage |= {"peak_rss_gb": main_peak / GB, "peak_rss_tree_gb": tree_peak / GB,
                      "cpu_s": sampler.cpu(stage["start_s"], stage["end_s"]),
                      "cpu_s_tree": sampler.cpu(stage["start_s"], stage["end_s"], "tree_cpu")}
        rows.append({"stage": "generate data (not a pipeline stage)", "wall_s": gen.wall_s, "cpu_s": gen.cpu_s,
                     "peak_rss_gb": gen.maxrss / GB, "peak_rss_tree_gb": None})
        for stage in stages:
            rows.append(stage)
            model = stage["stage"].split()[1] if stage["stage"].startswith("train ") else None
            if model and epochs.get(model):  # the epoch line gives the training part of the stage
                train_s = sum(e["seconds"] for e in epochs[model])
                stage["epoch_train_s"] = train_s
                stage["validation_and_setup_s"] = stage["wall_s"] - train_s
                rows.append({"stage": "  of which training epoch(s)", "wall_s": train_s})
                rows.append({"stage": "  of which validation + setup", "wall_s": stage["wall_s"] - train_s})
        rows.append({"stage": "pipeline total", "wall_s": pipe.wall_s, "peak_rss_gb": pipe.maxrss / GB,
                     "peak_rss_tree_gb": sampler.max("tree_rss") / GB,
                     "cpu_s": pipe.cpu_s})
        models: dict[str, Any] = {}
        indexes = index_files(work)
        for m in result["models"]:
            index = m.get("index") or {}
            version = m["registered"]["version"]
            on_disk = indexes.get(str(version))
            models[m["model"]] = {
                "seconds_per_epoch": m["seconds_per_epoch"],
                "epoch_lines": [{k: v for k, v in e.items() if k != "at_s"} for e in epochs.get(m["model"], [])],
                "valid_recall@20": m["valid"].get("recall@20"), "test_recall@20": m["test"].get("recall@20"),
                "test_ndcg@20": m["test"].get("ndcg@20"),
                "version": version, "alias": m["registered"]["alias"],
                "index": {k: index.get(k) for k in ("kind", "ntotal", "dim", "build_seconds", "ann_recall",
                                                      "ann_recall_k", "ef_search", "nprobe") if k in index},
                "index_json": {"path": on_disk["path"], "kind": on_disk["kind"],
                               "build_seconds": on_disk["build_seconds"]} if on_disk else None,
            }
        ingest = result.get("ingest", {})
        summary: dict[str, Any] = {
            "benchmark": "pipeline_scale",
            "requested": {"interactions": args.interactions, "items": args.items, "users": users},
            "generated": generated,
            "ingested": {k: ingest.get(k) for k in ("n_interactions", "n_users", "n_items", "n_entities",
                                                      "n_relations", "n_triples", "seconds")},
            "machine": machine(args.threads),
            "env": {k: env[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "POLARS_MAX_THREADS")},
            "pipeline_argv": pipe_argv[1:],
            "eval_user_sampling": False,
            "stages": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in s.items()} for s in stages],
            "pipeline": {"wall_s": round(pipe.wall_s, 2), "peak_rss_gb_wait4": pipe.maxrss / GB,
                         "peak_rss_tree_gb": sampler.max("tree_rss") / GB, "max_processes": sampler.max("procs"),
                         "cpu_s_wait4": round(pipe.cpu_s, 1),
                         "champion": f"{result['registered_model']} v{result['champion_version']}",
                         "models": models},
        }

        # 3. serving
        if not args.skip_serve:
            ids = known_users(ingest.get("snapshot_dir"), users, args.requests)
            served = run_serve(args.kgrec, work, result["registered_model"], ids, env, args.ready_timeout)
            summary["serve"] = served
            for model in models.values():  # the served bundle's index.json is in the serve cache now
                if model["index_json"] is None and (on_disk := index_files(work).get(str(model["version"]))):
                    model["index_json"] = {"path": on_disk["path"], "kind": on_disk["kind"],
                                           "build_seconds": on_disk["build_seconds"]}
            rows.append({"stage": "serve: start until /readyz 200", "wall_s": served["ready_s"],
                         "cpu_s": served["cpu_start_s"], "peak_rss_gb": served["peak_rss_start_gb"]})
            rows.append({"stage": f"serve: {served['requests']} requests k=100", "wall_s": served["requests_wall_s"],
                         "cpu_s": served["cpu_requests_s"], "peak_rss_gb": served["peak_rss_requests_gb"]})
        summary["total_wall_s"] = round(time.monotonic() - started, 1)
        summary["load_average"] = {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()]}

        # 4. report
        print_table(rows)
        print()
        for name, m in models.items():
            idx = m["index"]
            print(f"{name}: {m['seconds_per_epoch']:.1f} s/epoch (train), valid R@20 {m['valid_recall@20']}, "
                  f"test R@20 {m['test_recall@20']}; v{m['version']} {m['alias']}; index {idx.get('kind')} "
                  f"{idx.get('ntotal')} x {idx.get('dim')}, built in {idx.get('build_seconds')} s, "
                  f"recall@{idx.get('ann_recall_k')} {idx.get('ann_recall')}")
        if "serve" in summary:
            s = summary["serve"]
            print(f"serve {s['model_info'].get('name')} v{s['version']}: ready in {s['ready_s']:.1f} s, "
                  f"RSS {s['rss_ready_gb']:.2f} GB; {s['requests']} requests: p50 {s['p50_ms']:.1f} ms, "
                  f"p99 {s['p99_ms']:.1f} ms, errors {s['errors']}; stopped cleanly on SIGTERM in "
                  f"{s['stop_s']:.1f} s (exit {s['exit_code']})")
        print("evaluation: full ranking of every user with a held-out item over all items (the pipeline has "
              "no user-sampling option; --users makes users fewer)")
        print(f"load average (1, 5, 15 min) at start {load_start}, at end {summary['load_average']['end']} "
              f"on {os.cpu_count()} CPUs: wall times above the CPU seconds / threads mean a busy machine")
        print(f"threads: {summary['env']}; RSS sampled every {SAMPLE_S} s from /proc (+children: the "
              f"pipeline's process tree, Prefect's temporary server included); totals: wait4 peak")
        print(json.dumps(summary, default=str), flush=True)
        failed = False
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        elif failed:  # the children's logs stay for the post-mortem, the data (GBs at scale) goes
            for path in work.iterdir():
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                elif not path.name.endswith(".log"):
                    path.unlink(missing_ok=True)
            print(f"pipeline_scale: the children's logs are kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
