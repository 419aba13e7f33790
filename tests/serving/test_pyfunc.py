import pandas as pd
import pytest
from kgrec.serving.index import IndexConfig, build_and_measure, save_index
from kgrec.serving.pyfunc import TopKRecommender, signature


@pytest.fixture(scope="module")
def logged_model(tmp_path_factory, bundle, log_and_load_pyfunc):
    tmp_path = tmp_path_factory.mktemp("mlflow")
    bundle_dir = bundle.write(tmp_path / "bundle")
    index, info = build_and_measure(bundle.item_embeddings, IndexConfig(kind="hnsw"))
    index_dir = save_index(index, tmp_path / "index", info)
    return log_and_load_pyfunc(
        tmp_path, TopKRecommender(), {"bundle": str(bundle_dir), "index": str(index_dir)}, signature()
    )


def test_signature():
    sig = signature()
    assert sig.inputs.input_names() == ["user_id"]
    assert sig.params.params[0].name == "k" and sig.params.params[0].default == 20


def test_predict(logged_model, service):
    out = logged_model.predict(pd.DataFrame({"user_id": ["u1", "ghost", "u7"]}), params={"k": 15})
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


def test_predict_default_k(logged_model):
    out = logged_model.predict(pd.DataFrame({"user_id": ["u3"]}))
    assert len(out.loc[0, "item_ids"]) == 20
