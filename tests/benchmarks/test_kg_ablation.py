"""``benchmarks/kg_ablation.py``: the verdict rule on made-up runs, and a CPU smoke run of the
script (music, one seed, one epoch) that must print and record the three variants and resume."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kg_ablation.py"
sys.path.insert(0, str(SCRIPT.parent))  # the script imports its sibling `quality`
_spec = importlib.util.spec_from_file_location("kg_ablation", SCRIPT)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)
VARIANTS = ("kg", "no_kg", "shuffled_kg")


def fake_rows(values: dict[str, list[float]]) -> list[dict]:
    """Runs of music/kgat with test Recall@20 ``values[variant][k]`` for seed 2020 + k."""
    return [
        {"dataset": "music", "model": "kgat", "variant": v, "seed": 2020 + k, "epochs_cap": None,
         "recall@20": x, "ndcg@20": x / 2, "valid_recall@20": x}
        for v, xs in values.items() for k, x in enumerate(xs)
    ]


def test_verdict_needs_the_mean_beyond_the_sd_of_the_differences_and_of_each_variant():
    assert bench.verdict([0.02, 0.03, 0.025], [0.30, 0.31, 0.305], [0.28, 0.28, 0.28]) == "KG gain"
    assert bench.verdict([-0.02, -0.03, -0.025], [0.28, 0.28, 0.28], [0.30, 0.31, 0.305]) == "KG hurts"
    # consistent paired gain (sd of d 0.0005) but the variants themselves spread by 0.05
    assert bench.verdict([0.010, 0.011, 0.010], [0.30, 0.40, 0.35], [0.29, 0.389, 0.34]) == "within noise"
    assert bench.verdict([0.01, -0.01, 0.02], [0.30, 0.30, 0.31], [0.29, 0.31, 0.29]) == "within noise"
    assert bench.verdict([0.05], [0.35], [0.30]) == "n/a"


def test_paired_differences_match_seeds_and_count_wins():
    rows = fake_rows({"kg": [0.35, 0.36, 0.34], "no_kg": [0.30, 0.31, 0.29], "shuffled_kg": [0.36, 0.35]})
    entries = {e["comparison"]: e for e in bench.paired(rows)}
    no_kg, shuffled = entries["kg - no_kg"], entries["kg - shuffled_kg"]
    assert no_kg["seeds"] == [2020, 2021, 2022] and shuffled["seeds"] == [2020, 2021]  # paired seeds only
    assert no_kg["recall@20"]["diffs"] == pytest.approx([0.05, 0.05, 0.05])
    assert no_kg["recall@20"]["wins"] == 3 and no_kg["recall@20"]["verdict"] == "KG gain"
    assert shuffled["recall@20"]["diffs"] == pytest.approx([-0.01, 0.01])
    assert shuffled["recall@20"]["wins"] == 1 and shuffled["recall@20"]["verdict"] == "within noise"
    table = bench.paired_table(bench.paired(rows))
    assert "kg - no_kg" in table and "KG gain" in table and "within noise" in table


def test_select_keeps_the_requested_grid_and_the_first_of_a_repeated_run():
    rows = fake_rows({"kg": [0.35, 0.36], "no_kg": [0.30]}) + fake_rows({"kg": [0.99]})
    wanted = {("music", "kgat", "kg", 2020, None, None), ("music", "kgat", "no_kg", 2020, None, None)}
    chosen = bench.select(rows, wanted)
    assert [(r["variant"], r["recall@20"]) for r in chosen] == [("kg", 0.35), ("no_kg", 0.30)]
    # a run under a time cap is another run (rows without the key were uncapped)
    capped = [{**rows[0], "time_cap": 60.0}]
    assert bench.select(capped, wanted) == [] and bench.select(capped, {("music", "kgat", "kg", 2020, None, 60.0)})


def test_a_line_cut_short_is_skipped_and_the_next_row_starts_a_line_of_its_own(tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    first, second = fake_rows({"kg": [0.35, 0.36]})
    out.write_text(json.dumps(first) + "\n" + json.dumps(second)[:40])  # killed while writing
    assert bench.read_rows(out) == [first]
    assert "incomplete line" in capsys.readouterr().err
    bench.append_row(out, second)
    assert bench.read_rows(out) == [first, second]
    assert out.read_text().endswith("\n")


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_cpu_smoke_runs_the_three_variants_records_and_resumes(tmp_path, shared_data):
    """kgat on music, 1 seed, 1 epoch (~15 s), plus lightgcn, which ignores the KG: its three
    variants must agree to the last digit (same split, same seed), a check of the harness."""
    out = tmp_path / "results.jsonl"
    common = ["--datasets", "music", "--seeds", "2020", "--epochs", "1", "--threads", "1", "--out", str(out)]
    proc = run_script(*common, "--models", "kgat,lightgcn", "--workdir", str(tmp_path / "snapshots"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    runs = {(r["model"], r["variant"]): r for r in summary["runs"]}
    assert set(runs) == {(m, v) for m in ("kgat", "lightgcn") for v in VARIANTS}
    kgat = {v: runs["kgat", v] for v in VARIANTS}
    assert kgat["no_kg"]["n_triples"] == 0 and kgat["no_kg"]["n_relations"] == 0
    assert kgat["kg"]["n_triples"] == kgat["shuffled_kg"]["n_triples"] > 0
    assert len({r["snapshot_hash"] for r in kgat.values()}) == 3
    assert {r["base_hash"] for r in kgat.values()} == {kgat["kg"]["snapshot_hash"]}
    assert kgat["shuffled_kg"]["snapshot"] == "music-shuffled_kg-s2020"
    for r in summary["runs"]:
        assert r["threads"] == 1 and r["epochs_run"] == 1 and 0.0 < r["recall@20"] <= 1.0
    placebo = {(runs["lightgcn", v]["recall@20"], runs["lightgcn", v]["ndcg@20"]) for v in VARIANTS}
    assert len(placebo) == 1, placebo
    comparisons = {(e["model"], e["comparison"]) for e in summary["paired"]}
    assert comparisons == {(m, c) for m in ("kgat", "lightgcn") for c in ("kg - no_kg", "kg - shuffled_kg")}
    for variant in VARIANTS:
        assert f"music    kgat      {variant:<12}" in proc.stdout
    assert "verdict" in proc.stdout and "1 threads" in proc.stdout
    assert len(out.read_text().splitlines()) == 6

    # the same grid again: every run is in the file, nothing trains
    again = run_script(*common, "--models", "kgat")
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(out.read_text().splitlines()) == 6
    assert "music    kgat" not in again.stderr  # no run line: nothing was trained
    rerun = json.loads(again.stdout.strip().splitlines()[-1])
    assert [r["variant"] for r in rerun["runs"]] == list(VARIANTS)

    shown = run_script(*common, "--models", "kgat", "--table-only")
    assert shown.returncode == 0 and json.loads(shown.stdout.strip().splitlines()[-1]) == rerun


def test_rejects_unknown_variants_and_models(tmp_path):
    proc = run_script("--variants", "kg,shuffle", "--out", str(tmp_path / "x.jsonl"), "--table-only")
    assert proc.returncode == 2 and "unknown variants" in proc.stderr
    proc = run_script("--models", "mind", "--out", str(tmp_path / "x.jsonl"), "--table-only")
    assert proc.returncode == 2 and "not retrievers" in proc.stderr
