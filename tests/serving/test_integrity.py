"""Integrity of what is served: checksum manifests on indices (and bundles), verified at load; the
serving cache (one verified copy per version, reused, locked, pruned, no temp copies left)."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
import time
from types import SimpleNamespace

import faiss
import mlflow
import numpy as np
import pytest
from kgrec.models.tracking import registry
from kgrec.serving import cache as cache_module
from kgrec.serving import champion
from kgrec.serving.bundle import BundleError, load_bundle
from kgrec.serving.cache import CACHE_INFO, ServeCache, default_root
from kgrec.serving.export import register_bundle
from kgrec.serving.index import (
    INDEX_FILE,
    INFO_FILE,
    IndexConfig,
    build_index,
    load_index,
    save_index,
)
from kgrec.serving.integrity import (
    INDEX_MANIFEST_TAG,
    MANIFEST_FILE,
    IntegrityError,
    manifest_digest,
    verify_manifest,
    write_manifest,
)
from kgrec.serving.publish import publish_index

NAME = "kgrec-integrity"


def _nan_overwrite(index_dir) -> None:
    """Overwrite the stored vectors with NaN in place: same kind, same shape, same file size."""
    path = index_dir / INDEX_FILE
    size = path.stat().st_size
    stored = faiss.read_index(str(path))
    nan = faiss.IndexFlatIP(stored.d)
    nan.add(np.full((stored.ntotal, stored.d), np.nan, dtype=np.float32))
    faiss.write_index(nan, str(path))
    assert path.stat().st_size == size


@pytest.fixture()
def saved_index(tmp_path, bundle):
    index = build_index(bundle.item_embeddings, IndexConfig(kind="flat"))
    return save_index(index, tmp_path / "index", {"model_version": "1"})


# ---------------------------------------------------------------------------- index manifests
def test_an_index_overwritten_with_nans_at_the_same_size_is_refused_naming_items_faiss(saved_index, bundle):
    queries = bundle.user_embeddings[:20]
    clean, _ = load_index(saved_index)
    expected = clean.search(queries, 10)[1]
    _nan_overwrite(saved_index)
    with pytest.raises(IntegrityError, match=r"items\.faiss fails its checksum") as caught:
        load_index(saved_index)
    assert caught.value.file == INDEX_FILE and "sha256" in caught.value.reason
    # the finding: without the manifest the same file loads and serves another top-k
    (saved_index / MANIFEST_FILE).unlink()
    damaged, _ = load_index(saved_index)
    assert not np.array_equal(damaged.search(queries, 10)[1], expected)


def test_an_edited_or_truncated_index_json_is_refused(saved_index):
    info_path = saved_index / INFO_FILE
    info = json.loads(info_path.read_text())
    original = info_path.read_text()
    info_path.write_text(original.replace('"model_version": "1"', '"model_version": "2"'))  # same size
    with pytest.raises(IntegrityError, match=r"index\.json fails its checksum") as caught:
        load_index(saved_index)
    assert caught.value.file == INFO_FILE
    info["ef_search"] = 4096
    info_path.write_text(json.dumps(info))
    with pytest.raises(IntegrityError, match=r"index\.json has \d+ bytes, MANIFEST\.json says \d+"):
        load_index(saved_index)
    info_path.write_text(original)
    load_index(saved_index)  # restored: passes again
    (saved_index / INDEX_FILE).unlink()
    with pytest.raises(IntegrityError, match=r"missing items\.faiss"):
        load_index(saved_index)


def test_an_index_published_before_manifests_loads_with_a_warning(saved_index, bundle, caplog):
    (saved_index / MANIFEST_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="kgrec.serving"):
        index, _ = load_index(saved_index)
    assert index.ntotal == bundle.n_items
    assert "has no MANIFEST.json" in caplog.text and "unverified" in caplog.text
    with pytest.raises(IntegrityError, match="no MANIFEST.json"):
        verify_manifest(saved_index, "index", required=True)


def test_the_manifest_is_written_last_inside_the_atomic_directory(tmp_path, monkeypatch, bundle):
    """``write_manifest`` runs once, in the temp directory, with both files already there."""
    import kgrec.serving.index as index_module

    seen = []

    def spy(directory):
        seen.append((directory, sorted(p.name for p in directory.iterdir())))
        return write_manifest(directory)

    monkeypatch.setattr(index_module, "write_manifest", spy)
    out = save_index(build_index(bundle.item_embeddings), tmp_path / "index", {})
    [(directory, files)] = seen
    assert directory != out and directory.parent == out.parent and not directory.exists()
    assert files == [INFO_FILE, INDEX_FILE]
    assert sorted(json.loads((out / MANIFEST_FILE).read_text())["files"]) == [INFO_FILE, INDEX_FILE]


def test_a_tampered_bundle_is_both_a_bundle_error_and_an_integrity_error(tmp_path, bundle):
    out = bundle.write(tmp_path / "b")
    np.save(out / "item_embeddings.npy", np.full_like(bundle.item_embeddings, np.nan))
    with pytest.raises(BundleError, match="item_embeddings.npy fails its checksum") as caught:
        load_bundle(out)
    assert isinstance(caught.value, IntegrityError) and caught.value.file == "item_embeddings.npy"


def test_a_manifest_listing_a_path_outside_the_directory_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    write_manifest(tmp_path)
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    manifest["files"]["../a.txt"] = manifest["files"]["a.txt"]
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match="invalid path '../a.txt'"):
        verify_manifest(tmp_path)


# ---------------------------------------------------------------------------- the serving cache
@pytest.fixture()
def published(tmp_path, bundle):
    """A bundle and its index as a store holds them, and a fake ``download_version`` copying them in
    its layout (``model/artifacts/bundle``, ``index``); ``calls`` counts downloads."""
    source = tmp_path / "store"
    bundle_src = bundle.write(source / "bundle")
    index = build_index(bundle.item_embeddings, IndexConfig(kind="flat"))
    index_src = save_index(index, source / "index", {})
    calls: list[str] = []

    def download(version, destination, delay: float = 0.0):
        calls.append(str(version.version))
        time.sleep(delay)
        bundle_dir = destination / "model" / "artifacts" / "bundle"
        shutil.copytree(bundle_src, bundle_dir)
        shutil.copytree(index_src, destination / "index")
        return bundle_dir, destination / "index"

    return SimpleNamespace(bundle=bundle_src, index=index_src, calls=calls, download=download)


def _version(number: int | str, run_id: str = "run-a", tags: dict | None = None):
    return SimpleNamespace(name=NAME, version=str(number), run_id=run_id, source=f"models:/m-{run_id}",
                           tags={registry.INDEX_TAG: registry.INDEX_ARTIFACT, **(tags or {})})


@pytest.fixture()
def cache(tmp_path, monkeypatch, published) -> ServeCache:
    monkeypatch.setattr(cache_module, "download_version", published.download)
    return ServeCache(tmp_path / "cache")


def _leftovers(cache: ServeCache) -> list[str]:
    return sorted(p.name for p in cache.model_dir(NAME).iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_a_second_fetch_reuses_the_verified_copy_without_downloading(cache, published):
    first = cache.fetch(_version(3))
    assert first.downloaded and published.calls == ["3"]
    assert first.directory == cache.root / NAME / "v3" and (first.directory / CACHE_INFO).is_file()
    assert load_bundle(first.bundle_dir).n_items == load_index(first.index_dir)[0].ntotal
    again = ServeCache(cache.root).fetch(_version(3))  # a restarted process
    assert not again.downloaded and published.calls == ["3"]
    assert (again.bundle_dir, again.index_dir) == (first.bundle_dir, first.index_dir)
    assert cache.versions(NAME) == ["3"] and _leftovers(cache) == []


def test_a_corrupted_cached_copy_is_downloaded_again(cache, published):
    first = cache.fetch(_version(3))
    _nan_overwrite(first.index_dir)
    again = cache.fetch(_version(3))
    assert again.downloaded and published.calls == ["3", "3"]
    load_index(again.index_dir)  # the fresh copy passes
    assert _leftovers(cache) == []


def test_a_damaged_published_index_is_reported_and_leaves_nothing_behind(cache, published):
    _nan_overwrite(published.index)
    with pytest.raises(IntegrityError, match=r"items\.faiss fails its checksum"):
        cache.fetch(_version(3))
    assert not cache.version_dir(NAME, 3).exists() and _leftovers(cache) == []


def test_a_re_signed_index_differs_from_the_digest_recorded_at_publishing(cache, published):
    digest = manifest_digest(published.index)
    _nan_overwrite(published.index)
    write_manifest(published.index)  # files and manifest rewritten together: the manifest alone passes
    with pytest.raises(IntegrityError, match="not the one published with kgrec-integrity v3"):
        cache.fetch(_version(3, tags={INDEX_MANIFEST_TAG: digest}))
    assert cache.fetch(_version(3, tags={INDEX_MANIFEST_TAG: manifest_digest(published.index)})).downloaded


def test_a_version_number_registered_again_by_another_run_is_fetched_again(cache, published):
    cache.fetch(_version(3, run_id="run-a"))
    assert not cache.fetch(_version(3, run_id="run-a")).downloaded
    assert cache.fetch(_version(3, run_id="run-b")).downloaded
    assert published.calls == ["3", "3"]


def test_an_interrupted_fetch_leaves_no_copy_and_its_leftovers_go_on_the_next(cache, published, monkeypatch):
    def crash(version, destination):
        published.download(version, destination)
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_module, "download_version", crash)
    with pytest.raises(KeyboardInterrupt):
        cache.fetch(_version(3))
    assert not cache.version_dir(NAME, 3).exists() and _leftovers(cache) == []
    # what a SIGKILLed fetch leaves: a temp dir no live fetch owns
    stale = cache.model_dir(NAME) / ".v3.tmp-999999-abc"
    (stale / "model").mkdir(parents=True)
    monkeypatch.setattr(cache_module, "download_version", published.download)
    assert cache.fetch(_version(3)).downloaded
    assert not stale.exists() and _leftovers(cache) == []


def test_prune_removes_the_versions_not_kept(cache, published):
    for number in (1, 2, 3):
        cache.fetch(_version(number))
    (cache.model_dir(NAME) / ".v1.tmp-999999-x").mkdir()
    assert cache.prune(NAME, keep=["2", 3]) == ["1"]
    assert cache.versions(NAME) == ["2", "3"] and _leftovers(cache) == []
    assert not cache.fetch(_version(3)).downloaded and cache.fetch(_version(1)).downloaded


def test_prune_leaves_a_version_being_fetched_alone(cache, published):
    cache.fetch(_version(1))
    with cache.lock(NAME, 1):  # another process is fetching v1
        assert cache.prune(NAME, keep=[]) == []
    assert cache.versions(NAME) == ["1"]
    assert cache.prune(NAME, keep=[]) == ["1"] and cache.versions(NAME) == []


def test_concurrent_fetches_of_one_version_download_it_once(cache, published, monkeypatch):
    monkeypatch.setattr(cache_module, "download_version",
                        lambda version, destination: published.download(version, destination, delay=0.3))
    start = threading.Barrier(2)
    results, errors = [], []

    def fetch():
        start.wait()
        try:
            results.append(ServeCache(cache.root).fetch(_version(5)))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and len(results) == 2
    assert published.calls == ["5"] and sorted(r.downloaded for r in results) == [False, True]
    assert results[0].directory == results[1].directory
    assert cache.versions(NAME) == ["5"] and _leftovers(cache) == []


def test_the_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("KGREC_HOME", str(tmp_path / "home"))
    assert default_root() == tmp_path / "home" / "serve-cache" == ServeCache().root
    monkeypatch.delenv("KGREC_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_root() == tmp_path / ".cache" / "kgrec" / "serve"
    assert ServeCache(tmp_path / "x").root == tmp_path / "x"


# ---------------------------------------------------------------------------- champion loading
def test_an_index_that_does_not_fit_the_bundle_is_refused(tracking, cache, published, make_bundle, monkeypatch):
    other = make_bundle(n_items=799)
    shutil.rmtree(published.index)
    save_index(build_index(other.item_embeddings), published.index, {})
    monkeypatch.setattr(champion, "resolve_alias", lambda name, alias: _version(4))
    with pytest.raises(IntegrityError, match="holds 799 vectors of dim 16, the bundle 800 items of dim 16"):
        champion.load_registered(tracking, NAME, cache=cache)


def test_load_registered_serves_from_the_cache_and_leaves_no_temp_copies(tracking, tmp_path, monkeypatch, bundle):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setenv("TMPDIR", str(tmp))
    with registry.tracked_run("m", {"seed": 0}, {}) as run_id:
        mlflow.log_metric(registry.SELECTION_METRIC, 0.3)
    version = register_bundle(run_id, bundle.write(tmp_path / "bundle"), NAME, {})
    info = publish_index(version, tmp_path / "bundle", IndexConfig(kind="flat"))
    registry.promote(NAME, version)
    assert registry.resolve_alias(NAME).tags[INDEX_MANIFEST_TAG]
    before = sorted(p.name for p in tmp.iterdir())

    downloads = []
    real = cache_module.download_version
    monkeypatch.setattr(cache_module, "download_version", lambda v, d: downloads.append(v.version) or real(v, d))
    cache = ServeCache(tmp_path / "cache")
    service, first = champion.load_registered(tracking, NAME, cache=cache)
    assert first["index"]["ntotal"] == info["ntotal"] == bundle.n_items
    expected = service.for_user("u1", 10).item_idx
    for _ in range(2):  # restarts: served from the cache, nothing downloaded, nothing left in $TMPDIR
        service, _ = champion.load_registered(tracking, NAME, cache_dir=cache.root)
        np.testing.assert_array_equal(service.for_user("u1", 10).item_idx, expected)
    assert downloads == [version.version] and cache.versions(NAME) == [str(version.version)]
    assert sorted(p.name for p in tmp.iterdir()) == before
    assert not [p for p in tmp.rglob("kgrec-serve-*")]

    # the published index damaged in the store: a fresh fetch is refused, naming the file
    stored = tracking.workdir / "mlartifacts"
    [faiss_file] = [p for p in stored.rglob(INDEX_FILE) if p.parent.name == registry.INDEX_ARTIFACT]
    _nan_overwrite(faiss_file.parent)
    with pytest.raises(IntegrityError, match=r"items\.faiss fails its checksum"):
        champion.load_registered(tracking, NAME, cache=ServeCache(tmp_path / "fresh"))
