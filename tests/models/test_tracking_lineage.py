"""Lineage of a training run: the snapshot as its dataset input, the git commit and dirty flag of
the code, the kgrec version."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import shutil
import subprocess
from pathlib import Path

import mlflow
import pytest
from kgrec.features.dataset import InteractionData
from kgrec.features.split import random_split
from kgrec.features.synthetic import PowerLawConfig, powerlaw_snapshot
from kgrec.models.families import family_of
from kgrec.models.spec import get_spec
from kgrec.models.tracking import lineage
from kgrec.models.tracking.experiment import train_and_log
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _git(cwd: Path, *args: str) -> str:
    proc = subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, check=True)
    return proc.stdout.strip()


@pytest.fixture()
def repo(tmp_path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    _git(root, "init", "-q")
    (root / "code.py").write_text("x = 1\n")
    (root / ".gitignore").write_text("venv/\n")
    _git(root, "add", ".")
    _git(root, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "-m", "init")
    return root


@needs_git
def test_git_state_of_a_checkout_clean_then_dirty(repo):
    state = lineage.git_state(repo)
    assert state == lineage.GitState(commit=_git(repo, "rev-parse", "HEAD"), dirty=False)
    (repo / "new.py").write_text("y = 2\n")  # untracked code counts
    assert lineage.git_state(repo).dirty is True


@needs_git
def test_no_git_state_outside_a_checkout_or_in_an_ignored_folder(repo, tmp_path):
    outside = tmp_path / "plain"
    outside.mkdir()
    assert lineage.git_state(outside) is None
    installed = repo / "venv" / "site-packages" / "kgrec"  # an install into a venv inside a checkout
    installed.mkdir(parents=True)
    assert lineage.git_state(installed) is None
    assert lineage.GIT_COMMIT_TAG not in lineage.lineage_tags(outside)


def test_the_version_tag_is_the_installed_kgrec():
    assert lineage.lineage_tags(Path("/"))[lineage.VERSION_TAG] == importlib.metadata.version("kgrec")


def test_the_snapshot_dataset_is_metadata_only(tmp_path):
    snapshot = _snapshot(tmp_path)
    dataset = lineage.snapshot_dataset(snapshot)
    assert dataset.name == "tiny-powerlaw"
    assert dataset.digest == snapshot.hash[: lineage.DIGEST_LENGTH]
    assert json.loads(dataset.source.to_json()) == {"uri": snapshot.path.resolve().as_uri()}
    assert dataset.source._get_source_type() == "local"
    assert [c.name for c in dataset.schema.inputs] == snapshot.interactions.columns
    assert json.loads(dataset.to_dict()["profile"])["num_rows"] == snapshot.interactions.height


# ---------------------------------------------------------------------------- wired into train_and_log
def _snapshot(tmp_path: Path):
    snapshot = powerlaw_snapshot(PowerLawConfig(
        num_users=100, num_items=60, num_interactions=1_200, num_entities=30, num_triples=100,
        num_relations=3, seed=5,
    ))
    content = hashlib.sha256(snapshot.interactions.write_csv().encode()).hexdigest()
    path = tmp_path / f"tiny-powerlaw-{content[:12]}"
    path.mkdir(exist_ok=True)
    manifest = {**snapshot.manifest, "name": "tiny-powerlaw", "hash": content}
    return dataclasses.replace(snapshot, path=path, manifest=manifest)


def _train(data) -> str:
    spec = get_spec("bprmf")
    config = family_of(spec).config(spec, epochs=1, seed=1, embedding_dim=4)
    return train_and_log(spec, config, data).run_id


def test_a_training_run_records_its_snapshot_and_its_code(tracking, tmp_path):
    snapshot = _snapshot(tmp_path)
    data = InteractionData.from_snapshot(snapshot, random_split(snapshot.interactions, seed=1))
    run = MlflowClient().get_run(_train(data))

    (dataset_input,) = run.inputs.dataset_inputs
    dataset = dataset_input.dataset
    assert dataset.name == "tiny-powerlaw"
    assert dataset.digest == snapshot.hash[:36] and len(snapshot.hash) == 64
    assert json.loads(dataset.source) == {"uri": snapshot.path.resolve().as_uri()}
    assert [c["name"] for c in json.loads(dataset.schema)["mlflow_colspec"]] == ["user_idx", "item_idx"]
    tags = {t.key: t.value for t in dataset_input.tags}
    assert tags == {"mlflow.data.context": "training", lineage.SNAPSHOT_HASH_TAG: snapshot.hash}

    run_tags = run.data.tags
    assert run_tags[lineage.VERSION_TAG] == importlib.metadata.version("kgrec")
    state = lineage.git_state()
    if state is None:  # not a git checkout (an installed wheel): no git tags at all
        assert lineage.GIT_COMMIT_TAG not in run_tags and lineage.GIT_DIRTY_TAG not in run_tags
    else:
        head = _git(lineage.SOURCE_ROOT, "rev-parse", "HEAD")
        dirty = bool(_git(lineage.SOURCE_ROOT, "status", "--porcelain"))
        assert run_tags[lineage.GIT_COMMIT_TAG] == head
        assert run_tags[lineage.GIT_DIRTY_TAG] == str(dirty).lower()


def test_data_without_a_snapshot_logs_no_dataset_input(tracking, planted_data):
    run = MlflowClient().get_run(_train(planted_data))
    assert not run.inputs.dataset_inputs
    assert run.data.tags[lineage.VERSION_TAG] == importlib.metadata.version("kgrec")


def test_a_concurrent_insert_of_the_same_dataset_is_linked_not_fatal(monkeypatch):
    calls = []
    def fake(dataset, context, tags):
        calls.append(context)
        if len(calls) == 1:
            raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id")
    monkeypatch.setattr(mlflow, "log_input", fake)
    monkeypatch.setattr(lineage, "snapshot_dataset", lambda s: type("D", (), {"name": "music"})())
    snap = type("S", (), {"hash": "h"})()
    lineage.log_snapshot_input(snap)
    assert calls == ["training", "training"]
    monkeypatch.setattr(mlflow, "log_input", lambda *a, **k: (_ for _ in ()).throw(MlflowException("other")))
    with pytest.raises(MlflowException, match="other"):
        lineage.log_snapshot_input(snap)
