"""The model registry: every model declared once, and what derives from it (config validation,
defaults, pipeline choices, model building)."""

from __future__ import annotations

import pytest
from kgrec.flows.config import PipelineConfig
from kgrec.models.families import FAMILIES, SequenceInputs, family_of
from kgrec.models.sequential.config import SequentialModelConfig
from kgrec.models.sequential.multi_interest import MultiInterestModel
from kgrec.models.spec import (
    ModelSpec,
    build_model,
    get_spec,
    markdown_table,
    model_names,
    model_specs,
    register,
)
from pydantic import ValidationError

SEQUENTIAL_MODEL_NAMES = model_names("sequential")


def build_sequential_model(config: SequentialModelConfig, num_items: int) -> MultiInterestModel:
    return build_model(config, num_items)


def test_every_model_is_declared_once_with_a_known_family():
    specs = model_specs()
    assert len({s.name for s in specs}) == len(specs)
    assert {s.family for s in specs} == set(FAMILIES)
    assert {"bprmf", "lightgcn", "kgat", "rgcn", "hgt"} <= set(model_names("retriever"))
    assert model_names("ranker") == ("kcan",)
    # the docs table lists every model
    table = markdown_table()
    assert all(f"`{s.name}`" in table for s in specs)


def test_a_second_declaration_of_a_name_is_refused():
    known = get_spec("bprmf")
    with pytest.raises(ValueError, match="declared twice"):
        register(ModelSpec(name="bprmf", family="retriever", build=lambda c, d: None, summary="copy"))
    assert get_spec("bprmf") is known
    with pytest.raises(ValueError, match="family"):
        ModelSpec(name="x", family="scorer", build=lambda c, d: None, summary="")


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="lightgcn"):
        get_spec("lightgnc")
    with pytest.raises(ValueError, match="comirec_sa"):
        get_spec("kgat", "sequential")


def test_each_family_builds_its_own_config_from_the_spec_defaults():
    kgat = family_of("kgat").config(get_spec("kgat"), seed=3, epochs=None)
    assert (kgat.learning_rate, kgat.patience, kgat.seed) == (5e-3, 20, 3)
    assert kgat.params["mess_dropout"] == 0.0  # the spec's params default, merged into the class's
    kcan = family_of("kcan").config(get_spec("kcan"), seed=3, epochs=1000)
    assert kcan.seed == 3 and kcan.epochs == 30  # --epochs only lowers KCAN's (expensive) epochs
    assert family_of("kcan").config(get_spec("kcan"), epochs=2).epochs == 2
    assert family_of("comirec_sa_max").config(get_spec("comirec_sa_max")).readout == "max"


def test_pipeline_config_accepts_both_kinds_of_model_names():
    assert not set(SEQUENTIAL_MODEL_NAMES) & set(model_names("retriever"))
    config = PipelineConfig(dataset="ml-100k-seq", models=["youtube_dnn", "ComiRec_SA", "bprmf"])
    assert config.models == ["youtube_dnn", "comirec_sa", "bprmf"]
    assert config.model_name == "kgrec-ml-100k-seq"
    with pytest.raises(ValidationError, match="comirec_sa"):  # the choices name the sequential models
        PipelineConfig(models=["comirec"])


@pytest.mark.parametrize("name", SEQUENTIAL_MODEL_NAMES)
def test_every_sequential_model_builds_from_its_config(name):
    config = SequentialModelConfig.for_model(name, epochs=None, embedding_dim=8, seed=3)
    assert config.epochs == 30 and family_of(name).selection_metric(config) == "best_valid_recall_at_50"
    model = build_sequential_model(config, num_items=20)
    assert isinstance(model, MultiInterestModel) and model.num_items == 20
    assert model.merge_rule == {"mixture": "weighted", "comirec_sa_mos": "mixture"}.get(name, "max")
    assert (config.seed, config.selection_metric, config.ks) == (3, "recall@50", (20, 50))
    # the exact softmax up to 5,000 items, a popularity-sampled, log-Q-corrected one above
    assert config.softmax(1682) == (0, "exact") and config.softmax(50_000) == (
        1024, "uniform" if name == "comirec_sa_remi" else "popularity")
    assert config.decorrelation == (1.0 if name == "comirec_sa_mos" else 0.0)
    assert all(isinstance(v, str | int | float | bool) for v in config.to_dict().values())


def test_config_is_validated():
    with pytest.raises(ValidationError, match="extra"):
        SequentialModelConfig(model="mind", layers=3)
    with pytest.raises(ValidationError, match="selection_metric"):
        SequentialModelConfig(selection_metric="recall@100")
    with pytest.raises(ValidationError):
        SequentialModelConfig(model="mixture", num_interests=9, num_clusters=8)
    with pytest.raises(ValueError, match="unknown sequential model"):
        SequentialModelConfig.for_model("bprmf")
    assert build_sequential_model(SequentialModelConfig(merge_rule="weighted"), 5).merge_rule == "weighted"
    with pytest.raises(ValidationError, match="readout"):
        SequentialModelConfig(model="youtube_dnn", readout="mixture")
    with pytest.raises(ValidationError, match="normalize_interests"):
        SequentialModelConfig(model="comirec_dr", normalize_interests=True)


def test_the_presets_and_their_overrides():
    model = build_sequential_model(SequentialModelConfig.for_model("comirec_sa_mos"), 30)
    assert model.readout_kind == "mixture" and model.normalize_interests and model.merge_rule == "mixture"
    config = SequentialModelConfig.for_model("comirec_sa_mos", decorrelation=0.0, merge_rule="max")
    assert config.decorrelation == 0.0 and build_sequential_model(config, 30).merge_rule == "max"
    # the plain comirec_sa keeps the paper's hard readout
    assert build_sequential_model(SequentialModelConfig.for_model("comirec_sa"), 30).readout_kind == "hard"
    model = build_sequential_model(SequentialModelConfig.for_model("comirec_sa_max"), 30)
    assert model.readout_kind == "max" and model.merge_rule == "max" and model.diversity_weight == 0.5
    config = SequentialModelConfig.for_model("comirec_sa_max", merge_rule="controllable", diversity_weight=2.0)
    assert build_sequential_model(config, 30).diversity_weight == 2.0
    with pytest.raises(ValidationError, match="readout"):
        SequentialModelConfig(model="mind", readout="max")
    with pytest.raises(ValidationError, match="diversity_weight"):
        SequentialModelConfig(diversity_weight=-1.0)


def test_the_controllable_merge_needs_a_catalogue_with_categories():
    from types import SimpleNamespace

    import numpy as np
    from kgrec.features.sequences import SequenceSplit

    split = SequenceSplit(
        num_users=2, num_items=20, train_users=np.arange(1), train_sequences=[np.arange(5)],
        valid_users=np.arange(1, 2), valid_inputs=[np.arange(3)], valid_targets=[np.arange(3, 5)],
        test_users=np.arange(0), test_inputs=[], test_targets=[], seed=0,
    )
    no_genres = SimpleNamespace(n_items=20, has_categories=False, name="toy", hash="0")
    config = SequentialModelConfig.for_model("comirec_sa", merge_rule="controllable")
    inputs = SequenceInputs.of(no_genres, split)
    assert inputs.categories is None
    with pytest.raises(ValueError, match="categories"):  # before any training
        family_of("comirec_sa").fit(get_spec("comirec_sa"), config, inputs)


def test_models_that_need_a_kg_refuse_a_dataset_without_one(tmp_path):
    from kgrec.features.dataset import InteractionData
    from kgrec.features.ingest import ingest
    from kgrec.features.snapshot import load_snapshot
    from kgrec.features.spec import load_spec
    from kgrec.features.split import random_split

    # A user's spec next to its log, no KG declared (relative path: the spec's own folder).
    log = "".join(f"u{u},i{(u * 7 + k) % 30}\n" for u in range(40) for k in range(6))
    (tmp_path / "log.csv").write_text("user,item\n" + log)
    (tmp_path / "spec.yaml").write_text("name: nokg\ninteractions: {path: log.csv, format: csv, user: user, item: item}\n")
    snapshot = load_snapshot(ingest(load_spec(tmp_path / "spec.yaml"), tmp_path / "snap").snapshot_dir)
    data = InteractionData.from_snapshot(snapshot, random_split(snapshot.interactions, seed=0))
    assert {s.name for s in model_specs() if s.needs_kg} >= {"kgat", "kgin", "kgcl", "rgcn", "hgt", "rhgnn", "kcan"}
    family = family_of("kgat")
    config = family.config(get_spec("kgat"), epochs=1)
    with pytest.raises(ValueError, match=r"'kgat' needs a knowledge graph.*declares no 'item_links' and no 'kg'"):
        family.fit(get_spec("kgat"), config, data)
    # a model without a KG trains on it
    lightgcn = family_of("lightgcn")
    model, result = lightgcn.fit(get_spec("lightgcn"), lightgcn.config(get_spec("lightgcn"), epochs=1), data)
    assert result.best_epoch == 1
