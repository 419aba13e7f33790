"""MLflow pyfunc models of the bundles: top-k unseen items for known users, and the ranker's pair scores.

Both are *models from code* (no pickle): the logged model holds a small code file
(:data:`RETRIEVER_CODE`, :data:`RANKER_CODE`) that calls ``mlflow.models.set_model(...)`` on
:class:`TopKRecommender` or :class:`PairScorer`, the kgrec code itself under ``code/kgrec`` (staged
by :func:`stage_code`: ``__init__.py``, ``features/``, ``models/``, ``serving/``, no tests or
caches) and exact pins of the third-party distributions that code imports
(:func:`serving_requirements`; kgrec is not among them), so ``mlflow.pyfunc.load_model`` works in
an environment built from ``requirements.txt`` alone. :func:`log_bundle_model` logs a bundle that way::

    with mlflow.start_run():
        info = log_bundle_model(bundle_dir, name="lightgcn")   # + index_dir=... (optional)

:class:`TopKRecommender` works for both retrieval bundle kinds: an embedding retriever (user
vectors) and a multi-interest retriever (the user's stored, time-ordered history -> interests ->
merged per-interest searches, with the model's merge rule; history items excluded).

``predict(model_input, params={"k": 20})``: ``model_input`` is a DataFrame with a ``user_id`` column
(raw ids); the output has one row per input row with columns ``user_id``, ``item_ids`` (raw item ids,
best first, seen items excluded), ``scores`` and ``known`` (False -> empty lists). The ranker's
:class:`PairScorer` scores ``(user_id, item_id)`` rows (see its docstring).
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import importlib.util
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import polars as pl
import torch
from kgrec.models.tracking.registry import RANKER_KIND
from kgrec.serving.bundle import INDEX_DIRNAME, ITEMS_FILE, USERS_FILE, bundle_kind, id_lookup
from kgrec.serving.champion import open_service
from kgrec.serving.index import load_index
from kgrec.serving.ranking import RankerBundle
from mlflow.models.model import ModelInfo
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema

DEFAULT_K = 20
#: The models-from-code files (each calls ``mlflow.models.set_model`` on one class below).
RETRIEVER_CODE = Path(__file__).with_name("pyfunc_retriever.py")
RANKER_CODE = Path(__file__).with_name("pyfunc_ranker.py")
#: Subpackages of ``kgrec`` the pyfunc imports (transitively) and :func:`stage_code` bundles.
CODE_SUBPACKAGES = ("features", "models", "serving")
_CODE_IGNORE = shutil.ignore_patterns(
    "__pycache__", "*.pyc", "*.pyo", "tests", ".pytest_cache", ".ruff_cache", ".mypy_cache", "*.egg-info"
)
#: Distributions pinned besides those the staged code imports (parquet support of pandas).
EXTRA_REQUIREMENTS = ("pyarrow",)
EXAMPLE_ROWS = 3


# ---------------------------------------------------------------------------- signatures
def signature() -> ModelSignature:
    """Retrieval: ``user_id`` in; ``user_id``, ``item_ids``, ``scores``, ``known`` out; param ``k``."""
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string, "user_id")]),
        outputs=Schema(
            [
                ColSpec(DataType.string, "user_id"),
                ColSpec(Array(DataType.string), "item_ids"),
                ColSpec(Array(DataType.double), "scores"),
                ColSpec(DataType.boolean, "known"),
            ]
        ),
        params=ParamSchema([ParamSpec("k", "long", DEFAULT_K)]),
    )


def ranker_signature() -> ModelSignature:
    """Ranking: ``user_id``, ``item_id`` in; ``user_id``, ``item_id``, ``score``, ``known`` out."""
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string, "user_id"), ColSpec(DataType.string, "item_id")]),
        outputs=Schema(
            [
                ColSpec(DataType.string, "user_id"),
                ColSpec(DataType.string, "item_id"),
                ColSpec(DataType.double, "score"),
                ColSpec(DataType.boolean, "known"),
            ]
        ),
    )


# ---------------------------------------------------------------------------- models
class TopKRecommender(mlflow.pyfunc.PythonModel):
    # No type hints on predict: the signature validates the input. MLflow would otherwise wrap
    # predict and warn about the missing hints each time this module is imported (as ChatModel
    # and ResponsesAgent do, we opt out).
    _skip_type_hint_validation = True

    def __init__(self) -> None:
        self.service = None

    def load_context(self, context) -> None:
        artifacts = context.artifacts
        bundle_dir = Path(artifacts["bundle"])
        index_dir = artifacts.get("index")
        if index_dir is None and (bundle_dir / INDEX_DIRNAME).is_dir():
            index_dir = bundle_dir / INDEX_DIRNAME
        index = load_index(index_dir)[0] if index_dir is not None else None
        # either kind of bundle: embedding retriever or multi-interest retriever (stored histories)
        self.service = open_service(bundle_dir, index)

    def predict(self, context, model_input, params=None):  # no type hints: mlflow would validate them
        if self.service is None:
            self.load_context(context)
        service = self.service
        k = int((params or {}).get("k", DEFAULT_K) or DEFAULT_K)
        k = max(1, min(k, service.n_items))
        if isinstance(model_input, pd.DataFrame):
            if "user_id" not in model_input.columns:
                raise ValueError("model_input needs a 'user_id' column")
            raw = model_input["user_id"].tolist()
        elif isinstance(model_input, dict):
            raw = list(model_input["user_id"])
        else:
            raw = list(model_input)
        user_ids = ["" if u is None else str(u) for u in raw]
        results = service.for_users(user_ids, k)
        return pd.DataFrame(
            {
                "user_id": user_ids,
                "item_ids": [list(r.item_ids) if r is not None else [] for r in results],
                "scores": [[float(s) for s in r.scores] if r is not None else [] for r in results],
                "known": [r is not None for r in results],
            }
        )


class PairScorer(mlflow.pyfunc.PythonModel):
    """The ranking stage as a pyfunc: ``predict`` scores ``(user_id, item_id)`` rows with KCAN.

    Output columns: ``user_id``, ``item_id``, ``score`` (KCAN's score; NaN where the user or the item
    is unknown to the ranker) and ``known``.
    """

    # No type hints on predict: the signature validates the input. MLflow would otherwise wrap
    # predict and warn about the missing hints each time this module is imported (as ChatModel
    # and ResponsesAgent do, we opt out).
    _skip_type_hint_validation = True

    def __init__(self) -> None:
        self.bundle = None

    def load_context(self, context) -> None:
        self.bundle = RankerBundle.load(Path(context.artifacts["bundle"]))

    def predict(self, context, model_input, params=None):
        if self.bundle is None:
            self.load_context(context)
        frame = pd.DataFrame(model_input)
        missing = {"user_id", "item_id"} - set(frame.columns)
        if missing:
            raise ValueError(f"model_input needs columns {sorted(missing)}")

        users = id_lookup(self.bundle.users, "user_id", "user_idx")
        items = id_lookup(self.bundle.items, "item_id", "item_idx")
        u = np.array([users.get(str(x), -1) for x in frame["user_id"]], dtype=np.int64)
        i = np.array([items.get(str(x), -1) for x in frame["item_id"]], dtype=np.int64)
        known = (u >= 0) & (i >= 0)
        scores = np.full(len(frame), np.nan)
        if known.any():
            with torch.inference_mode():
                scores[known] = self.bundle.model.score_pairs(
                    torch.from_numpy(u[known]), torch.from_numpy(i[known])
                ).numpy()
        return pd.DataFrame(
            {
                "user_id": frame["user_id"].astype(str),
                "item_id": frame["item_id"].astype(str),
                "score": scores,
                "known": known,
            }
        )


# ---------------------------------------------------------------------------- logging
def _pin(package: str) -> str:
    try:
        installed = version(package)
    except PackageNotFoundError:
        return package
    # a local label (torch's "+cpu") only resolves on its own index: pin the public release
    return f"{package}=={installed.split('+', 1)[0]}"


@functools.cache
def _distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_modules(code_dir: Path) -> set[str]:
    """Top-level names of every absolute import in the ``.py`` files under ``code_dir`` but the
    standard library's and kgrec's (function-level imports included)."""
    names: set[str] = set()
    for path in sorted(Path(code_dir).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.partition(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.partition(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "kgrec" and not n.startswith("_")}


def serving_requirements(code_dir: Path, extra: Sequence[str] = EXTRA_REQUIREMENTS) -> list[str]:
    """Exact pins of the installed distributions the code under ``code_dir`` imports (the staged
    kgrec code, :func:`stage_code`; kgrec itself is not a requirement: it travels as code), plus
    ``extra``. A module several distributions provide (``mlflow``: mlflow, mlflow-skinny,
    mlflow-tracing) is pinned through the one of its own name when there is one."""
    distributions = _distributions()
    packages: set[str] = set(extra)
    for module in imported_modules(code_dir):
        dists = sorted(set(distributions.get(module, ())))
        own = [d for d in dists if _canonical(d) == _canonical(module)]
        packages.update(own or dists)
    packages = {p for p in packages if _canonical(p) != "kgrec"}
    return sorted((_pin(p) for p in packages), key=str.lower)


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"cannot locate the sources of {module}")
    return Path(next(iter(spec.submodule_search_locations)))


def stage_code(directory: Path) -> Path:
    """Copy the kgrec code the pyfunc needs into ``directory/kgrec`` -- ``__init__.py`` and the
    :data:`CODE_SUBPACKAGES` (each top-level folder of the checkout is a subpackage, see
    ``pyproject.toml``'s ``package-dir``), without tests and caches -- and return that folder
    (the ``code_paths`` entry: ``import kgrec.serving...`` works from it)."""
    target = Path(directory) / "kgrec"
    target.mkdir(parents=True, exist_ok=False)
    init = _package_dir("kgrec") / "__init__.py"
    if init.is_file():
        shutil.copy2(init, target / "__init__.py")
    else:
        (target / "__init__.py").touch()
    for sub in CODE_SUBPACKAGES:
        shutil.copytree(_package_dir(f"kgrec.{sub}"), target / sub, ignore=_CODE_IGNORE)
    return target


def input_example(bundle_dir: Path, rows: int = EXAMPLE_ROWS) -> pd.DataFrame:
    """A few real raw ids of the bundle (the first users by index; a ranker's rows pair them with
    the first items) -- the logged model's input example."""
    bundle_dir = Path(bundle_dir)
    users = pl.read_parquet(bundle_dir / USERS_FILE).sort("user_idx")["user_id"].head(rows).to_list()
    if bundle_kind(bundle_dir) != RANKER_KIND:
        return pd.DataFrame({"user_id": [str(u) for u in users]})
    items = pl.read_parquet(bundle_dir / ITEMS_FILE).sort("item_idx")["item_id"].head(rows).to_list()
    n = min(len(users), len(items))
    return pd.DataFrame({"user_id": [str(u) for u in users[:n]], "item_id": [str(i) for i in items[:n]]})


def _valid_name(name: str) -> str:
    """A logged model's name: the model's name with anything MLflow would refuse replaced."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_-") or "model"


def log_bundle_model(
    bundle_dir: Path, name: str, index_dir: Path | None = None, example: bool = True, **kwargs
) -> ModelInfo:
    """Log ``bundle_dir`` as a models-from-code pyfunc named ``name`` (the model's name) in the
    active run: the code file of its kind, the staged kgrec code, pinned requirements, the
    signature with outputs and (``example``) an input example of real ids, which MLflow validates
    by loading the logged model and predicting. ``kwargs`` go to ``mlflow.pyfunc.log_model``."""
    bundle_dir = Path(bundle_dir)
    ranker = bundle_kind(bundle_dir) == RANKER_KIND
    artifacts = {"bundle": str(bundle_dir)}
    if index_dir is not None:
        artifacts["index"] = str(index_dir)
    with tempfile.TemporaryDirectory(prefix="kgrec-code-") as staging:
        code = stage_code(Path(staging))
        return mlflow.pyfunc.log_model(
            name=_valid_name(name),
            python_model=str(RANKER_CODE if ranker else RETRIEVER_CODE),
            artifacts=artifacts,
            code_paths=[str(code)],
            signature=ranker_signature() if ranker else signature(),
            input_example=input_example(bundle_dir) if example else None,
            # explicit requirements: MLflow's inference would re-import the model in a subprocess
            pip_requirements=serving_requirements(code),
            **kwargs,
        )
