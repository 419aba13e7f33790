"""``benchmarks/pipeline_scale.py``: the stage cutter on a real pipeline log, the /proc sampler, the
generated dataset (it must ingest completely), and (slow) the whole script at a tiny size."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "pipeline_scale.py"
_spec = importlib.util.spec_from_file_location("pipeline_scale", SCRIPT)
bench = importlib.util.module_from_spec(_spec)
sys.modules["pipeline_scale"] = bench  # dataclasses look their module up there
_spec.loader.exec_module(bench)

# The stderr of `kgrec pipeline --models lightgcn,kgat --epochs 1 --parallel 1` (smoke run, 200k
# interactions), with the arrival times the benchmark's reader thread gave each line.
LOG = """\
9.093 14:30:00.971 | INFO    | prefect - Starting temporary server on http://127.0.0.1:8455
9.093 See https://docs.prefect.io/v3/concepts/server#how-to-guides for more information.
17.641 14:30:09.516 | INFO    | Flow run 'soft-warthog' - Beginning flow run 'soft-warthog' for flow 'kgrec-pipeline'
20.236 14:30:12.117 | INFO    | kgrec.features - ingested pipeline-scale -> /tmp/x (written): 200000 interactions
20.246 14:30:12.123 | INFO    | Task run 'ingest-fb3' - Finished in state Completed()
20.373 14:30:12.254 | INFO    | Flow run 'soft-warthog' - training lightgcn on pipeline-scale
20.419 14:30:12.301 | INFO    | Flow run 'soft-warthog' - training kgat on pipeline-scale
48.906 14:30:40.783 | INFO    | kgrec.models - epoch 1 loss=0.43917 26.45s valid recall@20=0.2624
49.014 14:30:40.894 | INFO    | kgrec.models - lightgcn: best epoch 1, valid recall@20 0.2624, 26.453 s/epoch
49.017 14:30:40.899 | INFO    | Task run 'train-lightgcn' - Finished in state Completed()
123.365 14:31:55.246 | INFO    | kgrec.models - epoch 1 loss=0.33894 69.86s valid recall@20=0.0137
123.478 14:31:55.359 | INFO    | kgrec.models - kgat: best epoch 1, valid recall@20 0.0137, 69.858 s/epoch
123.481 14:31:55.362 | INFO    | Task run 'train-kgat' - Finished in state Completed()
124.563 14:31:56.433 | INFO    | Task run 'evaluate-008' - Finished in state Completed()
128.611 14:32:00.493 | INFO    | kgrec.models - registered kgrec-pipeline-scale version 1 from run edc8
128.613 14:32:00.495 | INFO    | Task run 'register-bbf' - Finished in state Completed()
129.144 14:32:01.026 | INFO    | kgrec.serving - published flat index for kgrec-pipeline-scale v1: recall@100=1.0000
129.147 14:32:01.028 | INFO    | Task run 'publish-index-111' - Finished in state Completed()
129.336 14:32:01.218 | INFO    | kgrec.models - kgrec-pipeline-scale v1 best_valid_recall_at_20=0.2624 -> champion
129.346 14:32:01.228 | INFO    | Task run 'promote-549' - Finished in state Completed()
130.937 14:32:02.819 | INFO    | Task run 'evaluate-11a' - Finished in state Completed()
138.176 14:32:10.050 | INFO    | kgrec.models - registered kgrec-pipeline-scale version 2 from run 3946
138.176 14:32:10.052 | INFO    | Task run 'register-553' - Finished in state Completed()
138.984 14:32:10.866 | INFO    | kgrec.serving - published flat index for kgrec-pipeline-scale v2: recall@100=1.0000
138.999 14:32:10.869 | INFO    | Task run 'publish-index-25d' - Finished in state Completed()
139.167 14:32:11.048 | INFO    | kgrec.models - kgrec-pipeline-scale v2 best_valid_recall_at_20=0.0137 -> challenger
139.173 14:32:11.051 | INFO    | Task run 'promote-fb7' - Finished in state Completed()
139.208 14:32:11.088 | INFO    | Flow run 'soft-warthog' - champion of kgrec-pipeline-scale: v1
139.240 14:32:11.121 | INFO    | Flow run 'soft-warthog' - Finished in state Completed()
139.250 14:32:11.132 | INFO    | prefect - Stopping temporary server on http://127.0.0.1:8455
"""
STAGES = [
    "start-up (imports, Prefect server)", "ingest", "snapshot load", "split + graph inputs",
    "train lightgcn (1 epoch + validation)", "train kgat (1 epoch + validation)",
    "test evaluation lightgcn", "register lightgcn", "index build+publish lightgcn", "promote lightgcn",
    "test evaluation kgat", "register kgat", "index build+publish kgat", "promote kgat",
    "flow end (summary, artifacts)", "exit (Prefect server stop)",
]


def log_lines(text: str = LOG) -> list[tuple[float, str]]:
    out = []
    for line in text.splitlines():
        t, _, rest = line.partition(" ")
        out.append((float(t), rest))
    return out


def test_every_stage_is_cut_in_order_and_covers_the_run():
    stages, epochs = bench.cut_stages(log_lines(), 143.5, ("lightgcn", "kgat"))
    assert [s["stage"] for s in stages] == STAGES
    assert stages[0]["start_s"] == 0.0 and stages[-1]["end_s"] == 143.5
    for before, after in zip(stages, stages[1:]):
        assert before["end_s"] == after["start_s"]
    assert sum(s["wall_s"] for s in stages) == pytest.approx(143.5)
    by_name = {s["stage"]: s for s in stages}
    assert by_name["ingest"]["wall_s"] == pytest.approx(20.246 - 17.641)
    assert by_name["train kgat (1 epoch + validation)"]["wall_s"] == pytest.approx(123.481 - 49.017)
    assert by_name["register kgat"]["wall_s"] == pytest.approx(138.176 - 130.937)
    assert [e["seconds"] for e in epochs["lightgcn"]] == [26.45]
    assert [e["seconds"] for e in epochs["kgat"]] == [69.86]


def test_a_failed_task_or_a_missing_stage_fails_loudly(capsys):
    failed = LOG.replace("'register-553' - Finished in state Completed()", "'register-553' - Finished in state Failed('x')")
    with pytest.raises(SystemExit) as exc:
        bench.cut_stages(log_lines(failed), 143.5, ("lightgcn", "kgat"))
    assert exc.value.code == 1 and "register-553 finished in state Failed" in capsys.readouterr().err
    missing = "\n".join(line for line in LOG.splitlines() if "promote-fb7" not in line)
    with pytest.raises(SystemExit):
        bench.cut_stages(log_lines(missing), 143.5, ("lightgcn", "kgat"))
    assert "promote kgat" in capsys.readouterr().err


def test_sampler_sees_this_process_and_its_child():
    child = subprocess.Popen([sys.executable, "-c", "import time; x = b\"x\" * (64 << 20); time.sleep(30)"])
    try:
        for _ in range(200):  # until the child has allocated its 64 MiB
            usage = bench.tree_usage(os.getpid())
            if usage["procs"] >= 2 and usage["tree_rss"] - usage["main_rss"] > 60 << 20:
                break
            time.sleep(0.05)
        assert usage["procs"] >= 2 and usage["main_rss"] > 0
        assert usage["tree_rss"] - usage["main_rss"] > 60 << 20
        assert usage["main_cpu"] > 0
    finally:
        child.kill()
        child.wait()


def test_generated_dataset_ingests_completely(tmp_path):
    from kgrec.features.ingest import ingest
    from kgrec.features.spec import load_spec

    generated = bench.generate(tmp_path / "data", interactions=3000, items=300, users=60)
    assert generated["interactions"] == 3000 and generated["triples"] > 0
    report = ingest(load_spec(generated["spec"]), tmp_path / "snapshots")
    assert report.rows_accepted["interactions"] == 3000
    assert report.n_users == 60 and report.n_items == 300
    assert report.rows_accepted["item_links"] == 300
    # triples not reachable from an item are quarantined (disconnected); nearly all are kept
    assert report.n_triples >= 0.95 * generated["triples"]
    assert report.n_relations == 30


def test_refuses_a_workdir_inside_the_repository():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--workdir", str(SCRIPT.parent), "--interactions", "100",
                           "--items", "10"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "inside the repository" in proc.stderr


def test_a_failing_pipeline_exits_1_with_its_stderr_tail_and_keeps_only_the_logs(tmp_path):
    fake = tmp_path / "kgrec"
    fake.write_text("#!/bin/sh\necho 'kgrec pipeline: error: boom' >&2\nexit 3\n")
    fake.chmod(0o755)
    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--interactions", "2000", "--items", "200", "--kgrec",
                           str(fake), "--workdir", str(work)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "FAILED: kgrec pipeline exited 3" in proc.stderr and "error: boom" in proc.stderr
    assert not proc.stdout.strip()  # no table, no JSON line
    (run,) = work.iterdir()
    assert sorted(p.name for p in run.iterdir()) == ["generate.stderr.log", "pipeline.stderr.log"]


@pytest.mark.slow  # ~1-3 min: the whole pipeline (Prefect server, LightGCN, KGAT) and the service
def test_whole_benchmark_at_a_tiny_size(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--interactions", "20000", "--items", "2000", "--requests", "20",
         "--threads", "1", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [s["stage"] for s in summary["stages"]] == STAGES
    assert all(s["peak_rss_gb"] > 0.1 for s in summary["stages"])
    assert set(summary["pipeline"]["models"]) == {"lightgcn", "kgat"}
    serve = summary["serve"]
    assert serve["errors"] == 0 and serve["requests"] == 20 and serve["stopped_cleanly"]
    assert serve["p50_ms"] > 0 and serve["rss_ready_gb"] > 0.1
    assert list(tmp_path.iterdir()) == []  # the temporary directory is removed without --keep
