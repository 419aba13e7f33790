from __future__ import annotations

from pathlib import Path

import pytest
from kgrec.features.spec import DatasetSpec, MinWeight, SpecError, data_dir, load_spec, parse_spec


def test_bundled_specs_load() -> None:
    music = load_spec("music")
    assert music.name == "music" and music.positive == "any" and music.restrict_to_linked_items
    assert music.interactions.sep == "\t" and music.kg.head == 0
    ml = load_spec("ml-100k")
    assert ml.interactions.timestamp == "timestamp:float"
    assert ml.item_names is not None and ml.item_names.name == "movie_title:token_seq"


def test_load_spec_from_path_and_unknown_name(tmp_path: Path) -> None:
    source = Path(load_spec.__code__.co_filename).parent / "specs" / "music.yaml"
    copy = tmp_path / "copy.yaml"
    copy.write_text(source.read_text())
    assert load_spec(copy).model_dump() == load_spec("music").model_dump()
    with pytest.raises(SpecError, match="not a bundled spec"):
        load_spec("no-such-dataset")


def _base() -> dict:
    return {
        "name": "x",
        "interactions": {"path": "a.tsv", "user": "u", "item": "i"},
        "item_links": {"path": "l.tsv", "has_header": False, "item": 0, "entity": 1},
        "kg": {"path": "k.tsv", "has_header": False, "head": 0, "relation": 1, "tail": 2},
    }


def test_minimal_spec_defaults() -> None:
    spec = parse_spec(_base())
    assert spec.positive == "any" and spec.item_names is None
    # restrict_to_linked_items defaults to "when there are item links"
    assert spec.restrict_to_linked_items is None and spec.restricts_to_linked_items and spec.declares_kg


def test_kg_is_optional() -> None:
    spec = parse_spec({k: v for k, v in _base().items() if k not in ("item_links", "kg")})
    assert spec.item_links is None and spec.kg is None
    assert not spec.declares_kg and not spec.restricts_to_linked_items
    with pytest.raises(SpecError, match="'kg' needs 'item_links'"):
        parse_spec({k: v for k, v in _base().items() if k != "item_links"})
    with pytest.raises(SpecError, match="restrict_to_linked_items: true needs 'item_links'"):
        parse_spec({"name": "x", "interactions": _base()["interactions"], "restrict_to_linked_items": True})


def test_relative_paths_resolve_against_the_spec_folder(tmp_path: Path) -> None:
    folder = tmp_path / "mydata"
    folder.mkdir()
    (folder / "spec.yaml").write_text("name: mine\ninteractions: {path: log.csv, format: csv, user: u, item: i}\n")
    spec = load_spec(folder / "spec.yaml")
    assert spec.resolve("log.csv") == folder.resolve() / "log.csv"
    assert spec.resolve("/abs/log.csv") == Path("/abs/log.csv")
    # bundled specs (and specs built in code) keep the data-directory lookup
    assert load_spec("music").resolve("music/music.inter") == data_dir() / "music/music.inter"
    assert parse_spec(_base()).resolve("a.tsv") == data_dir() / "a.tsv"


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"colour": "red"}, "colour: Extra inputs are not permitted"),
        ({"interactions": {"path": "a.tsv", "user": "u", "item": "i", "sep": ","}}, "interactions.sep"),
        ({"interactions": {"path": "a.tsv", "user": 0, "item": 1}}, "has a header"),
        ({"kg": {"path": "k.tsv", "has_header": False, "head": "h", "relation": 1, "tail": 2}}, "has no header"),
        ({"positive": {"min_weight": 4}}, "needs a weight column"),
        ({"positive": "some"}, "positive"),
        ({"interactions": {"path": "a.tsv", "format": "xml", "user": "u", "item": "i"}}, "interactions.format"),
        ({"item_links": {"path": "l.tsv", "has_header": False, "item": 0, "entity": 0}}, "same column"),
        ({"name": "bad name!"}, "name"),
    ],
)
def test_spec_validation_errors_are_clear(patch: dict, message: str) -> None:
    with pytest.raises(SpecError, match="invalid dataset spec") as info:
        parse_spec({**_base(), **patch})
    assert message in str(info.value)


def test_min_weight_rule() -> None:
    raw = _base()
    raw["interactions"]["weight"] = "r"
    spec = parse_spec({**raw, "positive": {"min_weight": 4}})
    assert spec.positive == MinWeight(min_weight=4)


def test_invalid_yaml_is_a_spec_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(SpecError, match="invalid YAML"):
        load_spec(bad)
    bad.write_text("- a list")
    with pytest.raises(SpecError, match="mapping"):
        load_spec(bad)


def test_data_path_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec: DatasetSpec = parse_spec(_base())
    monkeypatch.setenv("KGREC_DATA_DIR", str(tmp_path))
    assert data_dir() == tmp_path
    assert spec.resolve("music/kg.txt") == tmp_path / "music" / "kg.txt"
    assert spec.resolve("/abs/file.tsv") == Path("/abs/file.tsv")
    monkeypatch.delenv("KGREC_DATA_DIR")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    # <repo>/../shared/data wins when it exists; otherwise <cwd>/shared/data is found.
    repo_candidate = Path(load_spec.__code__.co_filename).resolve().parent.parent.parent / "shared" / "data"
    assert data_dir() == (repo_candidate if repo_candidate.is_dir() else tmp_path / "shared" / "data")
