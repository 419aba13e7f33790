"""``benchmarks/multi_interest.py``: row overrides, and the pairing with the K = 1 control under the
same merge rule (issue 17's REMI target)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "multi_interest.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("multi_interest_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RECIPE = dict(embedding_dim=8, num_interests=4, seed=1, epochs=2, patience=3, learning_rate=1e-3,
              num_negatives=None, mask_seen=False, target_window=1)


def test_rows_take_overrides_and_keep_the_presets_defaults(bench) -> None:
    assert bench.split_row("comirec_sa_remi/hard_negative_beta=2/routing_reg=0/readout=max") == (
        "comirec_sa_remi", {"hard_negative_beta": 2, "routing_reg": 0, "readout": "max"})
    preset = bench.row_config("comirec_sa_remi", RECIPE, 1.0)
    assert preset.hard_negative_beta > 0 and preset.routing_reg > 0 and preset.num_negatives is None
    changed = bench.row_config("comirec_sa_remi/hard_negative_beta=0.5/num_negatives=64", RECIPE, 1.0)
    assert (changed.hard_negative_beta, changed.routing_reg, changed.num_negatives) == (
        0.5, preset.routing_reg, 64)
    # --num-negatives given: every row trains with it (the recipe wins over a preset's default)
    assert bench.row_config("comirec_sa_remi", RECIPE | {"num_negatives": 128}, 1.0).num_negatives == 128
    assert bench.row_config("comirec_sa_k1", RECIPE, 1.0).num_interests == 1
    with pytest.raises(ValueError, match="key=value"):
        bench.split_row("comirec_sa/beta")
    with pytest.raises(ValueError):  # validated by the config: no such field
        bench.row_config("comirec_sa/no_such_field=1", RECIPE, 1.0)


def _row(model: str, seed: int, r50: float, div: float, cos: float = 0.3, mixture: bool = False) -> dict:
    row = {"seed": seed, "model": model, "recipe": "base", "interest_similarity": cos,
           "valid_interest_similarity": cos}
    for part, prefix in (("test", ""), ("valid", "valid_")):
        row[prefix + "recall@50"], row[prefix + "diversity@50"] = r50, div
        if mixture:  # the row's own rule is the mixture; its max list is stored apart
            row[prefix + "max_merge_recall@50"], row[prefix + "max_merge_diversity@50"] = r50 - 0.1, div
        for lam in bench_lambdas():
            row[f"ctrl{lam:g}_{part}_recall@50"] = r50 - 0.01 * lam
            row[f"ctrl{lam:g}_{part}_diversity@50"] = div + 0.02 * lam
    return row


def bench_lambdas() -> tuple[float, ...]:
    return (0.25, 0.5, 1.0, 2.0)


def test_pairing_with_the_control_uses_the_same_merge(bench, capsys) -> None:
    assert bench.CONTROLLABLE_LAMBDAS == bench_lambdas()
    rows = []
    for seed in range(10):
        rows.append(_row("comirec_sa_k1", seed, 0.40, 0.50))
        # ahead on both in seeds 0-7, behind on recall in 8 and 9
        rows.append(_row("comirec_sa_remi", seed, 0.41 if seed < 8 else 0.39, 0.52))
        rows.append(_row("comirec_sa_mos", seed, 0.42, 0.55, mixture=True))
    bench.print_paired_same_merge(rows, part="test")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| comirec")]
    remi = [line for line in lines if line.startswith("| comirec_sa_remi |")]
    assert len(remi) == 1 + len(bench_lambdas())  # max, then each controllable lambda
    for line in remi:  # the same lambda on both sides: the differences are those of the lists
        assert "| 8/10 | 8/10 |" in line
    mos = {line.split(" | ")[4]: line for line in lines if line.startswith("| comirec_sa_mos |")}
    assert set(mos) == {"own", "max", *(f"ctrl λ = {lam:g}" for lam in bench_lambdas())}
    assert "| 10/10 | 10/10 |" in mos["own"]  # its mixture list against the control's list
    assert "| 0/10 | 0/10 |" in mos["max"]  # its max list is 0.08 behind
    assert "comirec_sa_k1 |" not in "".join(lines)  # the control is not paired with itself
