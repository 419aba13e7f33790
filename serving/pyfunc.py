"""MLflow pyfunc wrapper: top-k unseen items for known users.

Works for both bundle kinds: an embedding retriever (user vectors) and a multi-interest retriever
(the user's stored, time-ordered history -> interests -> merged per-interest searches, with the
model's merge rule; history items excluded).

Log with::

    mlflow.pyfunc.log_model(
        name="model",
        python_model=TopKRecommender(),
        artifacts={"bundle": str(bundle_dir)},          # + optional "index": str(index_dir)
        signature=signature(),
    )

``predict(model_input, params={"k": 20})``: ``model_input`` is a DataFrame with a ``user_id`` column
(raw ids); the output has one row per input row with columns ``user_id``, ``item_ids`` (raw item ids,
best first, seen items excluded), ``scores`` and ``known`` (False -> empty lists).
"""

from __future__ import annotations

import mlflow.pyfunc
import pandas as pd
from kgrec.serving.bundle import INDEX_DIRNAME, id_lookup
from kgrec.serving.champion import open_service
from kgrec.serving.index import load_index
from kgrec.serving.ranking import RankerBundle
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

DEFAULT_K = 20


def signature() -> ModelSignature:
    return ModelSignature(
        inputs=Schema([ColSpec("string", "user_id")]),
        params=ParamSchema([ParamSpec("k", "long", DEFAULT_K)]),
    )


class TopKRecommender(mlflow.pyfunc.PythonModel):
    def __init__(self) -> None:
        self.service = None

    def load_context(self, context) -> None:
        from pathlib import Path


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
                "item_ids": [r.item_ids if r is not None else [] for r in results],
                "scores": [r.scores.tolist() if r is not None else [] for r in results],
                "known": [r is not None for r in results],
            }
        )


def ranker_signature() -> ModelSignature:
    return ModelSignature(inputs=Schema([ColSpec("string", "user_id"), ColSpec("string", "item_id")]))


class PairScorer(mlflow.pyfunc.PythonModel):
    """The ranking stage as a pyfunc: ``predict`` scores ``(user_id, item_id)`` rows with KCAN.

    Output columns: ``user_id``, ``item_id``, ``score`` (KCAN's score; NaN where the user or the item
    is unknown to the ranker) and ``known``.
    """

    def __init__(self) -> None:
        self.bundle = None

    def load_context(self, context) -> None:
        from pathlib import Path


        self.bundle = RankerBundle.load(Path(context.artifacts["bundle"]))

    def predict(self, context, model_input, params=None):
        import numpy as np
        import torch

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
