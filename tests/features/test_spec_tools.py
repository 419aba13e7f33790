"""The spec reference, `kgrec spec init` (a draft from raw files) and `kgrec spec check`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from kgrec.features.spec import DatasetSpec, SpecError, load_spec, parse_spec
from kgrec.features.spec_tools import check_spec, draft_spec, json_schema, reference_markdown

from kgrec.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_the_committed_reference_is_generated_from_the_model() -> None:
    committed = (REPO / "docs" / "dataset-spec.md").read_text(encoding="utf-8")
    assert committed == reference_markdown(), "regenerate it: kgrec spec docs > docs/dataset-spec.md"


def test_every_key_is_documented() -> None:
    schema = json_schema()
    for name, definition in {"DatasetSpec": schema, **schema["$defs"]}.items():
        for key, prop in definition["properties"].items():
            assert prop.get("description"), f"{name}.{key} has no description"
            assert f"| `{key}` |" in reference_markdown()
    # the schema really is the validator's: a key it does not list is rejected
    assert schema["additionalProperties"] is False
    with pytest.raises(SpecError, match="Extra inputs"):
        parse_spec({"name": "x", "interactions": {"path": "a", "user": "u", "item": "i"}, "colour": 1})


def test_spec_schema_command_prints_the_schema(capsys) -> None:
    assert main(["spec", "schema"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["properties"].keys() == DatasetSpec.model_fields.keys()


def _write_raw(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    rows = ["customer_id,product_id,rating,ts"]
    rows += [f"c{u},p{(u * 3 + k) % 40},{1 + (u + k) % 5},{1_600_000_000 + 60 * (u * 10 + k)}" for u in range(50) for k in range(8)]
    (root / "ratings.csv").write_text("\n".join(rows) + "\n")
    # headerless links (item, entity) for 30 of the 40 products, and a headerless KG
    (root / "links.tsv").write_text("".join(f"p{i}\te{i}\n" for i in range(30)))
    (root / "kg.tsv").write_text("".join(f"e{i}\tgenre\tg{i % 4}\n" for i in range(30)) + "x1\tgenre\tx2\n")


def test_init_drafts_a_spec_that_validates_and_check_dry_runs_it(tmp_path: Path) -> None:
    raw = tmp_path / "data"
    _write_raw(raw)
    text, guesses = draft_spec([raw / "ratings.csv", raw / "links.tsv", raw / "kg.tsv"], "shop", raw)
    spec = parse_spec(yaml.safe_load(text))
    assert "# guessed" in text and "docs/dataset-spec.md" in text
    assert [g.kind for g in guesses] == ["interactions", "item_links", "kg"]
    assert spec.interactions.format == "csv" and spec.interactions.has_header
    assert (spec.interactions.user, spec.interactions.item) == ("customer_id", "product_id")
    assert (spec.interactions.timestamp, spec.interactions.weight) == ("ts", "rating")
    assert spec.item_links.has_header is False and (spec.item_links.item, spec.item_links.entity) == (0, 1)
    assert (spec.kg.head, spec.kg.relation, spec.kg.tail) == (0, 1, 2)
    assert spec.interactions.path == "ratings.csv"  # relative to the spec's folder
    assert spec.restrict_to_linked_items is True  # 30 of 40 sampled products are linked
    (raw / "spec.yaml").write_text(text)
    result = check_spec(raw / "spec.yaml", rows=100)
    dry = result["dry_run"]
    assert dry["accounting"]["interactions"]["read"] == 100
    assert dry["quarantined"]["kg"] == {"disconnected": 1} and dry["has_kg"]
    assert dry["n_linked_items"] == dry["n_items"] <= 30


def test_init_without_a_kg_and_the_cli(tmp_path: Path, capsys) -> None:
    raw = tmp_path / "data"
    _write_raw(raw)
    out = raw / "spec.yaml"
    assert main(["spec", "init", str(raw / "ratings.csv"), "--out", str(out), "--name", "shop"]) == 0
    spec = load_spec(out)
    assert spec.kg is None and spec.item_links is None and spec.resolve(spec.interactions.path) == (raw / "ratings.csv").resolve()
    assert main(["spec", "init", str(raw / "ratings.csv"), "--out", str(out)]) == 2  # no silent overwrite
    assert "--force" in capsys.readouterr().err
    assert main(["spec", "check", str(out), "--rows", "50", "--json"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["dry_run"]["has_kg"] is False and last["dry_run"]["n_interactions"] == 50


def test_check_reports_missing_files_and_bad_specs(tmp_path: Path, capsys) -> None:
    (tmp_path / "spec.yaml").write_text("name: x\ninteractions: {path: nowhere.csv, format: csv, user: u, item: i}\n")
    assert main(["spec", "check", str(tmp_path / "spec.yaml")]) == 2
    assert "nowhere.csv" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("name: x\ninteractions: {path: a.csv, user: u}\n")
    assert main(["spec", "check", str(tmp_path / "bad.yaml")]) == 2
    assert "interactions.item: Field required" in capsys.readouterr().err
