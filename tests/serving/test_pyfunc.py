"""The bundles as MLflow pyfunc models: models from code (no pickle), named after the model, the
kgrec code bundled (loads where kgrec is not installed), pinned requirements, a signature with
outputs and an input example of real ids."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import polars as pl
import pytest
import scipy.sparse as sp
import torch
from kgrec.features.dataset import InteractionData
from kgrec.models.rankers.kcan import KCANConfig, build_kcan
from kgrec.serving.index import IndexConfig, build_and_measure, save_index
from kgrec.serving.pyfunc import (
    RANKER_CODE,
    RETRIEVER_CODE,
    PairScorer,
    TopKRecommender,
    log_bundle_model,
    ranker_signature,
    serving_requirements,
    signature,
    stage_code,
)
from kgrec.serving.ranking import RankerBundle
from mlflow import MlflowClient
from mlflow.models import Model

#: Run in a fresh interpreter: hide the editable install of kgrec (a meta-path finder mapping
#: kgrec.* to the checkout), prove kgrec is not importable, then load the logged model from its
#: directory and predict. Prints the predictions and where every kgrec module came from.
FRESH_LOAD = r"""
import json, sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path_importer_cache.clear()
try:
    import kgrec
except ModuleNotFoundError:
    pass
else:
    sys.exit("kgrec is importable before loading: " + str(getattr(kgrec, "__file__", None)))
import mlflow.pyfunc
import pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.predict(pd.DataFrame({"user_id": json.loads(sys.argv[2])}), params={"k": int(sys.argv[3])})
print(json.dumps({
    "item_ids": [list(x) for x in out["item_ids"]],
    "known": [bool(x) for x in out["known"]],
    "python_model": type(model.unwrap_python_model()).__name__,
    "kgrec_files": sorted(m.__file__ for n, m in sys.modules.items()
                          if (n == "kgrec" or n.startswith("kgrec.")) and getattr(m, "__file__", None)),
}))
"""


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _log(tmp_path: Path, bundle_dir: Path, name: str, **kwargs) -> SimpleNamespace:
    """Log ``bundle_dir`` with :func:`log_bundle_model` into a throwaway sqlite store, download the
    logged model and load it back; MLflow's warnings while logging are kept."""
    previous = mlflow.get_tracking_uri()
    records = _Records()
    mlflow_logger = logging.getLogger("mlflow")
    mlflow_logger.addHandler(records)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        exp = mlflow.create_experiment("pyfunc-test", artifact_location=(tmp_path / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=exp):
            info = log_bundle_model(bundle_dir, name, **kwargs)
        logged = MlflowClient().get_logged_model(info.model_id)
        downloaded = mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "download"))
        model_dir = Path(downloaded)
        model = mlflow.pyfunc.load_model(info.model_uri)
    finally:
        mlflow_logger.removeHandler(records)
        mlflow.set_tracking_uri(previous)
    return SimpleNamespace(info=info, logged=logged, dir=model_dir, model=model, warnings=records.messages)


def _fresh_load(model_dir: Path, user_ids: list[str], k: int, cwd: Path) -> dict:
    # -I: no PYTHONPATH, no user site, no current directory on sys.path (the checkout's kgrec/)
    proc = subprocess.run(
        [sys.executable, "-I", "-c", FRESH_LOAD, str(model_dir), json.dumps(user_ids), str(k)],
        capture_output=True, text=True, timeout=240, cwd=cwd,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _requirements(model_dir: Path) -> list[str]:
    lines = (model_dir / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip()]


# ---------------------------------------------------------------------------- retriever
@pytest.fixture(scope="module")
def logged(tmp_path_factory, bundle) -> SimpleNamespace:
    tmp_path = tmp_path_factory.mktemp("mlflow")
    bundle_dir = bundle.write(tmp_path / "bundle")
    index, info = build_and_measure(bundle.item_embeddings, IndexConfig(kind="hnsw"))
    index_dir = save_index(index, tmp_path / "index", info)
    out = _log(tmp_path, bundle_dir, "lightgcn", index_dir=index_dir)
    out.tmp, out.bundle_dir = tmp_path, bundle_dir
    return out


def test_signature_has_inputs_outputs_and_k():
    sig = signature()
    assert sig.inputs.input_names() == ["user_id"]
    assert sig.params.params[0].name == "k" and sig.params.params[0].default == 20
    outputs = {c["name"]: c for c in sig.outputs.to_dict()}
    assert list(outputs) == ["user_id", "item_ids", "scores", "known"]
    assert outputs["user_id"]["type"] == "string" and outputs["known"]["type"] == "boolean"
    assert (outputs["item_ids"]["type"], outputs["item_ids"]["items"]["type"]) == ("array", "string")
    assert (outputs["scores"]["type"], outputs["scores"]["items"]["type"]) == ("array", "double")
    ranker = ranker_signature()
    assert ranker.inputs.input_names() == ["user_id", "item_id"]
    assert [(c["name"], c["type"]) for c in ranker.outputs.to_dict()] == [
        ("user_id", "string"), ("item_id", "string"), ("score", "double"), ("known", "boolean")
    ]


def test_the_logged_model_is_named_after_the_model(logged):
    assert logged.info.name == "lightgcn"
    assert logged.logged.name == "lightgcn"
    assert logged.logged.artifact_location.rstrip("/").endswith("artifacts")


def test_it_is_a_model_from_code_without_a_pickle(logged):
    assert not list(logged.dir.rglob("*.pkl")), "a pickled python model was logged"
    flavor = Model.load(logged.dir).flavors["python_function"]
    assert "python_model" not in flavor  # the cloudpickle file's key
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    code_file = logged.dir / Path(flavor["model_code_path"]).name
    assert code_file.read_text() == RETRIEVER_CODE.read_text()
    assert "set_model(TopKRecommender())" in code_file.read_text()
    assert type(logged.model.unwrap_python_model()) is TopKRecommender


def test_the_kgrec_code_travels_with_the_model(logged):
    code = logged.dir / Model.load(logged.dir).flavors["python_function"]["code"] / "kgrec"
    assert (code / "__init__.py").is_file()
    for module in ("serving/pyfunc.py", "serving/champion.py", "models/spec.py", "features/snapshot.py"):
        assert (code / module).is_file(), module
    assert not list(code.rglob("__pycache__")) and not list(code.rglob("*.pyc"))
    assert not (code / "flows").exists() and not (code / "cli.py").exists()


def test_requirements_pin_third_party_packages_not_kgrec(logged):
    lines = _requirements(logged.dir)
    names = {line.split("==")[0].lower() for line in lines}
    assert "kgrec" not in names and not any("kgrec" in line for line in lines)
    assert all("==" in line for line in lines), lines
    for package in ("mlflow", "numpy", "scipy", "polars", "pandas", "faiss-cpu", "torch", "torch-geometric",
                    "pydantic"):
        assert package in names, package
    torch_pin = next(line for line in lines if line.lower().startswith("torch=="))
    assert torch_pin == f"torch=={importlib.metadata.version('torch').split('+')[0]}"


def test_it_loads_where_kgrec_is_not_installed_and_predicts_the_same(logged, tmp_path):
    users = ["u1", "u7", "ghost", "u42"]
    fresh = _fresh_load(logged.dir, users, 10, cwd=tmp_path)
    here = logged.model.predict(pd.DataFrame({"user_id": users}), params={"k": 10})
    assert fresh["known"] == [True, True, False, True]
    assert fresh["item_ids"] == [list(ids) for ids in here["item_ids"]]
    assert fresh["python_model"] == "TopKRecommender"
    code_dir = str(logged.dir / "code" / "kgrec")
    assert fresh["kgrec_files"] and all(f.startswith(code_dir) for f in fresh["kgrec_files"])
    # every third-party package the loaded kgrec modules import is pinned in requirements.txt
    dists = importlib.metadata.packages_distributions()
    pinned = {line.split("==")[0].lower().replace("_", "-") for line in _requirements(logged.dir)}
    for path in fresh["kgrec_files"]:
        for node in ast.walk(ast.parse(Path(path).read_text())):
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops = [node.module.split(".")[0]]
            else:
                continue
            for top in tops:
                if top in sys.stdlib_module_names or top == "kgrec":
                    continue
                assert {d.lower().replace("_", "-") for d in dists.get(top, [top])} & pinned, (path, top)


def test_the_input_example_is_real_user_ids_and_validates(logged, bundle):
    meta = Model.load(logged.dir)
    example = meta.load_input_example(logged.dir)
    first = bundle.users.sort("user_idx")["user_id"].head(3).to_list()
    assert list(example.columns) == ["user_id"] and example["user_id"].tolist() == first
    assert (logged.dir / "serving_input_example.json").is_file()
    # MLflow validated it by loading the logged model and predicting: no failure was reported
    failed = [m for m in logged.warnings if "Failed to validate serving input example" in m]
    assert not failed, failed
    out = logged.model.predict(example)
    assert out["known"].all() and all(len(ids) == 20 for ids in out["item_ids"])


def test_predict(logged, service):
    out = logged.model.predict(pd.DataFrame({"user_id": ["u1", "ghost", "u7"]}), params={"k": 15})
    assert list(out.columns) == ["user_id", "item_ids", "scores", "known"]
    assert out["known"].tolist() == [True, False, True]
    assert list(out.loc[1, "item_ids"]) == [] and list(out.loc[1, "scores"]) == []
    for row in (0, 2):
        uid = out.loc[row, "user_id"]
        ids = list(out.loc[row, "item_ids"])
        scores = list(out.loc[row, "scores"])
        assert len(ids) == len(scores) == 15
        assert scores == sorted(scores, reverse=True)
        seen = {f"i{j}" for j in service.seen_items(uid).tolist()}
        assert not seen & set(ids)
        # HNSW on 800 items: same ranking as the exact service for the top of the list
        assert len(set(ids) & set(service.for_user(uid, 15).item_ids)) >= 13


def test_predict_default_k(logged):
    out = logged.model.predict(pd.DataFrame({"user_id": ["u3"]}))
    assert len(out.loc[0, "item_ids"]) == 20


def test_requirements_follow_the_imports_of_the_staged_code(tmp_path):
    code = stage_code(tmp_path)
    (code / "serving" / "extra.py").write_text("import yaml\nfrom faiss import IndexFlatIP\n")
    names = {line.split("==")[0] for line in serving_requirements(code)}
    assert {"PyYAML", "faiss-cpu", "mlflow"} <= names
    assert not {"mlflow-skinny", "mlflow-tracing", "kgrec"} & names  # mlflow's own distribution only
    with pytest.raises(FileExistsError):
        stage_code(tmp_path)


# ---------------------------------------------------------------------------- ranker
N_USERS, N_ITEMS = 40, 60


@pytest.fixture(scope="module")
def ranker_logged(tmp_path_factory) -> SimpleNamespace:
    tmp_path = tmp_path_factory.mktemp("ranker")
    rng = np.random.default_rng(1)
    rows = np.repeat(np.arange(N_USERS), 6)
    cols = np.concatenate([(u % 3) * 20 + rng.choice(20, 6, replace=False) for u in range(N_USERS)])
    train = sp_csr(rows, cols)
    empty = sp_csr(np.zeros(0, int), np.zeros(0, int))
    data = InteractionData(N_USERS, N_ITEMS, train, empty, empty, snapshot=None, split=None)
    torch.manual_seed(0)
    config = KCANConfig(embedding_dim=8, layer_sizes=(8,), relation_dim=8, neighbours_per_node=3,
                        local_dim=4, tower_dim=8)
    users = pl.DataFrame({"user_id": [f"user-{N_USERS - 1 - i}" for i in range(N_USERS)],
                          "user_idx": np.arange(N_USERS)})
    items = pl.DataFrame({"item_id": [f"item-{i}" for i in range(N_ITEMS)], "item_idx": np.arange(N_ITEMS)})
    bundle = RankerBundle(build_kcan(config, data).eval(), users, items,
                          {"model": "kcan", "alpha": 0.5, "num_candidates": 20})
    out = _log(tmp_path, bundle.write(tmp_path / "ranker"), "kcan")
    out.bundle = bundle
    return out


def sp_csr(rows, cols):
    return sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(N_USERS, N_ITEMS))


def test_the_ranker_is_a_model_from_code_named_kcan(ranker_logged):
    assert ranker_logged.info.name == ranker_logged.logged.name == "kcan"
    assert not list(ranker_logged.dir.rglob("*.pkl"))
    flavor = Model.load(ranker_logged.dir).flavors["python_function"]
    assert (ranker_logged.dir / Path(flavor["model_code_path"]).name).read_text() == RANKER_CODE.read_text()
    assert type(ranker_logged.model.unwrap_python_model()) is PairScorer
    assert not any("kgrec" in line for line in _requirements(ranker_logged.dir))
    sig = Model.load(ranker_logged.dir).signature
    assert sig.outputs.input_names() == ["user_id", "item_id", "score", "known"]


def test_the_ranker_example_pairs_real_ids_and_scores(ranker_logged):
    example = Model.load(ranker_logged.dir).load_input_example(ranker_logged.dir)
    bundle = ranker_logged.bundle
    assert example["user_id"].tolist() == bundle.users.sort("user_idx")["user_id"].head(3).to_list()
    assert example["item_id"].tolist() == bundle.items.sort("item_idx")["item_id"].head(3).to_list()
    assert not [m for m in ranker_logged.warnings if "Failed to validate" in m]
    ghost = pd.DataFrame({"user_id": ["ghost"], "item_id": ["x"]})
    out = ranker_logged.model.predict(pd.concat([example, ghost], ignore_index=True))
    assert out["known"].tolist() == [True, True, True, False]
    assert np.isfinite(out["score"][:3]).all() and np.isnan(out["score"].iloc[3])
