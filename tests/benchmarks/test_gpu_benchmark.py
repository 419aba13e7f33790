"""Smoke tests of ``benchmarks/gpu.py`` on the CPU: the one-call GPU benchmark must run first time."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.py"
MODELS = {"lightgcn", "kgat", "kgin"}


def run_benchmark(*extra: str, tmp_path: Path) -> tuple[dict, str]:
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--scale", "0.005", "--epochs", "1",
         "--threads", "1", "--json-out", str(out), *extra],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == summary
    return summary, proc.stdout


def check_run(row: dict) -> None:
    assert "error" not in row and "skipped" not in row, row
    assert row["seconds_per_epoch"] > 0
    assert row["timed_epochs"] == 1 and len(row["warmup_seconds"]) == 1
    assert row["steps"] >= 1 and row["effective_batch"] >= 1
    assert row["steps"] == row["settings"]["batches_per_epoch"]
    assert 0.0 <= row["valid_recall@20"] <= 1.0
    assert row["peak_rss_mb"] > 0


def test_cpu_smoke_prints_every_model(tmp_path):
    summary, stdout = run_benchmark(tmp_path=tmp_path)
    runs = {r["model"]: r for r in summary["runs"]}
    assert set(runs) == MODELS
    for row in runs.values():
        check_run(row)
        assert row["deterministic"] is True
    assert runs["kgat"]["kg_steps"] >= 1 and "kg_seconds" in runs["kgat"]["last_epoch_extra"]
    env = summary["env"]
    assert env["device"] == "cpu" and env["torch"] and "device_name" in env
    data = summary["data"]
    assert data["relations"] == 40 and data["users"] == 350 and data["triples"] > 0
    assert 0 < data["valid_users"] <= 1000
    for name in MODELS:
        assert f"== {name}:" in stdout


@pytest.mark.slow  # ~30 s: two more interpreter starts (the CUDA default, checked here on the CPU)
def test_isolated_run_and_parity(tmp_path):
    """The CUDA default: each run in a child process, data handed over as a pickle, then the
    CPU-vs-device parity check (CPU vs CPU here: exactly equal)."""
    summary, _ = run_benchmark("--isolate", "yes", "--models", "lightgcn", "--parity", tmp_path=tmp_path)
    lightgcn, parity = summary["runs"]
    assert lightgcn["model"] == "lightgcn"
    check_run(lightgcn)
    assert parity["model"] == "parity" and parity["ok"] and parity["max_rel_diff"] == 0.0


def test_cuda_request_falls_back_with_a_message(monkeypatch, capsys):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what the module sets by default
    spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.pick_device("cuda") == "cpu"
    assert "FALLING BACK TO THE CPU" in capsys.readouterr().out
    assert gpu.pick_device("cpu") == "cpu"
