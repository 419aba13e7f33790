"""Data-parallel training (``kgrec train --nproc 2``: torchrun, gloo) against one process.

Two ranks shard every batch and average their gradients before each step, so they compute the
gradient of the whole batch's mean loss, as one process does, up to the order of float sums. The
tolerance on validation figures is 1e-3 absolute after 3 epochs (seen: equal to 5 decimals).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlflow
import pytest

from kgrec.cli import _without_nproc

TOLERANCE = 1e-3


def test_the_ranks_do_not_launch_again():
    assert _without_nproc(["-v", "train", "--nproc", "2", "--model", "bprmf"]) == ["-v", "train", "--model", "bprmf"]
    assert _without_nproc(["train", "--nproc=4", "--json"]) == ["train", "--json"]


def _train(workdir, nproc: int, model: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KGREC_HOME": str(workdir)}
    for key in ("MLFLOW_TRACKING_URI", "KGREC_TRACKING_URI", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    out = subprocess.run(
        [sys.executable, "-m", "kgrec.cli", "train", "--dataset", "music", "--model", model, "--epochs", "3",
         "--nproc", str(nproc), "--workdir", str(workdir), "--json"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("model", ["lightgcn"])
def test_two_processes_reach_the_metrics_of_one(shared_data, tmp_path, model):
    one = _train(tmp_path, 1, model)
    two = _train(tmp_path, 2, model)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["epochs_run"] == two["epochs_run"] == 3
    for key in ("recall@20", "ndcg@20", "recall@100"):
        assert abs(one["valid"][key] - two["valid"][key]) <= TOLERANCE, (key, one["valid"], two["valid"])
        assert abs(one["test"][key] - two["test"][key]) <= TOLERANCE, (key, one["test"], two["test"])
    # A model that learnt something, not two equal failures.
    assert one["valid"]["recall@20"] > 0.1
    # Rank 0 alone tracked: one run per launch, the world size among its params.
    mlflow.set_tracking_uri(two["tracking_uri"])
    runs = mlflow.search_runs(experiment_names=["kgrec"], output_format="list")
    assert sorted(r.data.params["world_size"] for r in runs) == ["1", "2"]
    assert {r.info.status for r in runs} == {"FINISHED"}
