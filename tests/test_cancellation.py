"""Stopping `kgrec pipeline`: SIGINT/SIGTERM mid-training and mid-publish, a SIGKILL's orphans, and
two pipelines started at once on one fresh store. Real processes, real signals, the music data."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.e2e

KGREC = str(Path(sys.executable).with_name("kgrec"))
NAME = "kgrec-music"


def _env(work: Path) -> dict[str, str]:
    env = os.environ | {
        "PREFECT_HOME": str(work / "prefect"),
        "KGREC_HOME": str(work / "kgrec"),
        "OMP_NUM_THREADS": "1",
    }
    for name in ("MLFLOW_TRACKING_URI", "KGREC_TRACKING_URI", "PREFECT_API_URL"):  # e.g. a sourced stack.env
        env.pop(name, None)
    return env


def _client(work: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{work / 'kgrec' / 'mlflow.db'}")


def _pipeline(models: str, epochs: int) -> list[str]:
    return ["pipeline", "--dataset", "music", "--models", models, "--epochs", str(epochs), "--json"]


def _children(pid: int) -> set[int]:
    """Descendants of ``pid`` (the Prefect temporary server among them)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _run_until(argv: list[str], env: dict[str, str], marker: str, timeout: float = 240):
    """Start ``kgrec argv`` and return the process once ``marker`` appears on its stderr."""
    proc = subprocess.Popen([KGREC, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            assert proc.poll() is None, "".join(seen)[-3000:]
            continue
        seen.append(line)
        if marker in line:
            return proc
    proc.kill()
    pytest.fail(f"{marker!r} never appeared:\n" + "".join(seen)[-3000:])


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_mid_training_stops_within_seconds_and_leaves_no_version(tmp_path, shared_data, sig, code):
    env = _env(tmp_path)
    proc = _run_until(_pipeline("bprmf", 500), env, "epoch 2 loss")
    children = _children(proc.pid)
    assert children, "the Prefect temporary server should be a child process"
    sent = time.monotonic()
    proc.send_signal(sig)
    stdout, _ = proc.communicate(timeout=60)
    stopped_after = time.monotonic() - sent

    assert proc.returncode == code
    assert stopped_after < 20, f"took {stopped_after:.1f} s to stop"  # about 4 s on 2 idle cores
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["status"] == "cancelled" and summary["signal"] == signal.Signals(sig).name
    assert "no new version" in summary["kept"] and "KILLED" in summary["kept"]
    client = _client(tmp_path)
    assert client.search_model_versions(f"name='{NAME}'") == []
    runs = client.search_runs([client.get_experiment_by_name("kgrec").experiment_id])
    assert [r.info.status for r in runs] == ["KILLED"]
    deadline = time.monotonic() + 15  # this test's process reaps; init may be slower with orphans
    while [pid for pid in children if _alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [pid for pid in children if _alive(pid)], "a child process outlived the pipeline"


# Runs the CLI with publishing replaced by a signal to itself: deterministic timing for "during publish".
SIGNAL_DURING_PUBLISH = """
import os, signal, sys, time
import kgrec.flows.pipeline as pipeline
from kgrec.cli import main

def publish_index_for(trained, version, bundle_dir):
    os.kill(os.getpid(), signal.{sig})
    time.sleep(30)
    raise AssertionError("the signal did not interrupt publishing")

pipeline.publish_index_for = publish_index_for
sys.exit(main({argv!r}))
"""


def _run_with_signal_during_publish(sig: str, argv: list[str], env: dict[str, str], out: Path):
    """(exit code, stdout, stderr). Output goes to files and the run gets its own process group: a
    SIGKILL leaves the Prefect temporary server running (nothing can stop it from the dead
    process), holding any pipe open, so the test stops that group itself."""
    script = SIGNAL_DURING_PUBLISH.format(sig=sig, argv=argv)
    with open(out / "stdout", "w") as stdout, open(out / "stderr", "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=stdout, stderr=stderr,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=300)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    return code, (out / "stdout").read_text(), (out / "stderr").read_text()


def test_publishing_cut_short_leaves_no_half_registered_version(tmp_path, shared_data):
    env = _env(tmp_path)
    # 1. SIGKILL between registration and promotion: an orphan pending version, nothing to clean it up
    code, _, stderr = _run_with_signal_during_publish("SIGKILL", _pipeline("bprmf", 1), env, tmp_path)
    assert code == -signal.SIGKILL, stderr[-3000:]
    client = _client(tmp_path)
    (orphan,) = client.search_model_versions(f"name='{NAME}'")
    assert orphan.tags["kgrec.state"] == "pending" and not orphan.aliases

    # 2. the next run removes it and ends its run KILLED, then registers its own champion
    ok = subprocess.run([KGREC, *_pipeline("bprmf", 1)], env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]
    champion = json.loads(ok.stdout.strip().splitlines()[-1])["champion_version"]
    assert {str(v.version) for v in client.search_model_versions(f"name='{NAME}'")} == {champion}
    assert client.get_run(orphan.run_id).info.status == "KILLED"

    # 3. SIGINT while publishing: the version is rolled back, the champion stays, exit 130
    code, stdout, stderr = _run_with_signal_during_publish("SIGINT", _pipeline("lightgcn", 1), env, tmp_path)
    assert code == 130, stderr[-3000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["status"] == "cancelled" and "no new version" in summary["kept"]
    assert {str(v.version) for v in client.search_model_versions(f"name='{NAME}'")} == {champion}
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == champion
    lightgcn = client.search_runs(
        [client.get_experiment_by_name("kgrec").experiment_id], "tags.`kgrec.model` = 'lightgcn'"
    )
    assert [r.info.status for r in lightgcn] == ["KILLED"]


def test_two_pipelines_at_once_on_a_fresh_store_both_finish_and_the_better_one_wins(tmp_path, shared_data):
    env = _env(tmp_path)
    procs = [
        subprocess.Popen([KGREC, *_pipeline(model, 3)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
        for model in ("bprmf", "lightgcn")
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for proc, (_, stderr) in zip(procs, outputs):
        assert proc.returncode == 0, stderr[-3000:]
    results = [json.loads(stdout.strip().splitlines()[-1])["models"][0] for stdout, _ in outputs]
    best = max(results, key=lambda m: m["valid"]["recall@20"])
    client = _client(tmp_path)
    versions = client.search_model_versions(f"name='{NAME}'")
    assert len(versions) == 2 and all(v.tags["kgrec.state"] == "ready" for v in versions)
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == best["registered"]["version"]
    (loser,) = [v for v in versions if str(v.version) != best["registered"]["version"]]
    # worse and promoted second: challenger; promoted first, then displaced: previous
    assert set(client.get_model_version(NAME, loser.version).aliases) in ({"challenger"}, {"previous"})


def test_a_failing_pipeline_prints_one_error_line_and_json(tmp_path, shared_data):
    env = _env(tmp_path) | {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    # nothing listens on port 9: the tracking server is unreachable
    argv = [KGREC, *_pipeline("bprmf", 1), "--tracking-uri", "http://127.0.0.1:9"]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    error = json.loads(proc.stdout.strip().splitlines()[-1])
    assert error["status"] == "failed" and "127.0.0.1:9" in error["error"]
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("kgrec pipeline: error: ")]
    assert "127.0.0.1:9" in line and line.endswith("(-v for the traceback)")
