"""Ingestion at scale: wall time and peak memory of `kgrec ingest` on a generated CSV log.

Generates (in chunks, so the generator needs far less memory than the ingestion) a CSV interaction
log of about ``--size-gb`` GB with power-law users and items, RFC 4180 quoted fields (some rows
fully quoted, some ids with an embedded comma, a doubled quote or a line break) and a small
fraction of malformed rows of every kind (wrong field count, missing user / item, bad weight,
bad timestamp, empty line, repeated header, bad quoting, exact duplicates), plus matching
headerless item-link and KG files, all in a temporary work directory (never the repository).
Then runs ``kgrec ingest --json`` on it as a child process with pinned threads and prints its
wall time, its peak RSS (``wait4`` rusage of that child), the input size, the in-memory size of
the accepted interactions (``estimated_size()`` of the snapshot's interactions table), the
ratio of the two, the RSS of the same command on a tiny input (imports alone) and the
accounting identity of each source.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ingest_scale.py [--size-gb 2] [--keep]
        [--data DIR (reuse a kept data set)] [--kgrec EXECUTABLE] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

HEADER = "user_id,item_id,rating,timestamp"
#: Fractions of the log rows that are malformed, per kind (quarantined), and quoted (valid).
MALFORMED = {
    "wrong_field_count": 2e-4,
    "missing_user": 2e-4,
    "missing_item": 2e-4,
    "bad_weight": 2e-4,
    "bad_timestamp": 2e-4,
    "empty_line": 1e-4,
    "repeated_header": 1e-5,
    "bad_quoting": 1e-4,
    "duplicate_event": 2e-4,
}
QUOTED = {"all_fields": 0.05, "embedded_comma": 1e-3, "doubled_quote": 1e-3, "embedded_newline": 1e-4}
THREADS = "1"


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, POLARS_MAX_THREADS="
        f"{os.environ.get('POLARS_MAX_THREADS')}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    )


def generate(root: Path, size_bytes: int, seed: int = 2020) -> dict:
    """Write log.csv, links.tsv, kg.tsv and spec.yaml under ``root``; return what was written."""
    rng = np.random.default_rng(seed)
    est_rows = max(1000, size_bytes // 30)
    n_users = max(100, est_rows // 40)
    n_items = max(100, min(2_000_000, est_rows // 60))
    chunk = 1_000_000
    written = rows = 0
    kinds = list(MALFORMED) + list(QUOTED)
    probs = np.array([*MALFORMED.values(), *QUOTED.values()])
    with open(root / "log.csv", "wb") as f:
        f.write((HEADER + "\n").encode())
        written += len(HEADER) + 1
        previous: pl.DataFrame | None = None
        while written < size_bytes:
            n = int(min(chunk, max(1000, (size_bytes - written) // 28)))
            user = (n_users * rng.random(n) ** 3).astype(np.int64)  # heavy head: power law
            item = (n_items * rng.random(n) ** 2).astype(np.int64)
            frame = pl.DataFrame(
                {
                    "u": pl.Series(user).cast(pl.String),
                    "i": pl.Series(item).cast(pl.String),
                    "r": pl.Series(rng.integers(1, 6, n)).cast(pl.String),
                    "t": pl.Series(rng.integers(880_000_000, 1_700_000_000, n)).cast(pl.String),
                    "kind": pl.Series(rng.choice(len(kinds) + 1, n, p=[1 - probs.sum(), *probs])),
                }
            )
            code = {k: c + 1 for c, k in enumerate(kinds)}
            u, i, r, t, kind = pl.col("u"), pl.col("i"), pl.col("r"), pl.col("t"), pl.col("kind")
            plain = pl.concat_str([pl.lit("u") + u, pl.lit("i") + i, r, t], separator=",")
            variants = {
                "wrong_field_count": pl.concat_str([pl.lit("u") + u, pl.lit("i") + i, r], separator=","),
                "missing_user": pl.concat_str([pl.lit(""), pl.lit("i") + i, r, t], separator=","),
                "missing_item": pl.concat_str([pl.lit("u") + u, pl.lit(" "), r, t], separator=","),
                "bad_weight": pl.concat_str([pl.lit("u") + u, pl.lit("i") + i, pl.lit("abc"), t], separator=","),
                "bad_timestamp": pl.concat_str([pl.lit("u") + u, pl.lit("i") + i, r, pl.lit("yesterday")], separator=","),
                "empty_line": pl.lit(""),
                "repeated_header": pl.lit(HEADER),
                "bad_quoting": pl.concat_str([pl.lit('"u') + u + pl.lit('"x'), pl.lit("i") + i, r, t], separator=","),
                "all_fields": pl.concat_str(
                    [pl.lit('"u') + u + pl.lit('"'), pl.lit('"i') + i + pl.lit('"'), pl.lit('"') + r + pl.lit('"'),
                     pl.lit('"') + t + pl.lit('"')], separator=","),
                "embedded_comma": pl.concat_str([pl.lit('"u') + u + pl.lit(',x"'), pl.lit("i") + i, r, t], separator=","),
                "doubled_quote": pl.concat_str([pl.lit('"u') + u + pl.lit('""q"'), pl.lit("i") + i, r, t], separator=","),
                "embedded_newline": pl.concat_str([pl.lit('"u') + u + pl.lit('\nx"'), pl.lit("i") + i, r, t], separator=","),
            }
            line = plain
            for name, expr in variants.items():
                line = pl.when(kind == code[name]).then(expr).otherwise(line)
            out = frame.select(line.alias("line"), kind)
            if previous is not None:  # an exact duplicate of a row of the previous chunk
                dups = out["kind"] == code["duplicate_event"]
                donors = previous.filter(pl.col("kind") == 0)["line"].head(int(dups.sum()))
                if donors.len() == int(dups.sum()):
                    out = out.with_columns(out["line"].scatter(np.flatnonzero(dups.to_numpy()), donors))
            text = out.select(pl.col("line") + "\n")["line"].str.join("")[0].encode()
            f.write(text)
            written += len(text)
            rows += n
            previous = out
    linked_items = int(n_items * 0.98)  # the rest: item_not_linked
    links = pl.DataFrame({"i": [f"i{k}" for k in range(linked_items)], "e": [f"e{k}" for k in range(linked_items)]})
    links.write_csv(root / "links.tsv", separator="\t", include_header=False)
    n_triples = max(100, min(2_000_000, n_items * 2))
    kg = pl.DataFrame(
        {
            "h": pl.Series((linked_items * rng.random(n_triples) ** 2).astype(np.int64)).cast(pl.String),
            "r": pl.Series(rng.integers(0, 30, n_triples)).cast(pl.String),
            "t": pl.Series(rng.integers(0, linked_items * 3, n_triples)).cast(pl.String),
        }
    ).select((pl.lit("e") + pl.col("h")).alias("h"), (pl.lit("rel") + pl.col("r")).alias("r"), (pl.lit("e") + pl.col("t")).alias("t"))
    kg.write_csv(root / "kg.tsv", separator="\t", include_header=False)
    spec = f"""name: ingest-scale
interactions:
  path: {root / "log.csv"}
  format: csv
  user: user_id
  item: item_id
  weight: rating
  timestamp: timestamp
positive: any
item_links:
  path: {root / "links.tsv"}
  format: tsv
  has_header: false
  item: 0
  entity: 1
kg:
  path: {root / "kg.tsv"}
  format: tsv
  has_header: false
  head: 0
  relation: 1
  tail: 2
restrict_to_linked_items: true
"""
    (root / "spec.yaml").write_text(spec)
    return {"log_rows": rows, "log_bytes": (root / "log.csv").stat().st_size, "users": n_users, "items": n_items}


def run_ingest(kgrec: str, spec: Path, out: Path, env: dict[str, str]) -> dict:
    """Run the ingest command as a child; wall time and that child's own peak RSS (wait4)."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        child = subprocess.Popen(
            [kgrec, "ingest", "--spec", str(spec), "--out", str(out), "--json"], stdout=stdout, stderr=stderr, env=env
        )
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        stdout.seek(0)
        stderr.seek(0)
        text, errors = stdout.read().decode(), stderr.read().decode()
    if child.returncode != 0:
        raise SystemExit(f"{kgrec} ingest failed ({child.returncode}):\n{errors[-3000:]}")
    report = json.loads(text.strip().splitlines()[-1])
    return {"wall_s": wall, "peak_rss_bytes": usage.ru_maxrss * 1024, "report": report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=2.0)
    parser.add_argument("--keep", action="store_true", help="keep the generated data and snapshot")
    parser.add_argument("--data", type=Path, help="reuse a data directory kept by an earlier --keep run")
    parser.add_argument("--workdir", type=Path, default=None, help="where the temp directory goes (default: $TMPDIR)")
    parser.add_argument("--kgrec", default=str(Path(sys.executable).with_name("kgrec")), help="the kgrec executable")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ["POLARS_MAX_THREADS"] = os.environ.get("POLARS_MAX_THREADS", THREADS)
    os.environ["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", THREADS)
    env = dict(os.environ)
    where = machine()
    work = Path(tempfile.mkdtemp(prefix="kgrec-bench-ingest-", dir=args.workdir))
    try:
        if args.data:
            data, generated = args.data, {"reused": str(args.data)}
        else:
            data = work / "data"
            data.mkdir()
            started = time.perf_counter()
            generated = generate(data, int(args.size_gb * 1e9))
            generated["generate_s"] = round(time.perf_counter() - started, 1)
            generated["generator_peak_rss_bytes"] = _self_peak_rss()
        tiny = work / "tiny"
        tiny.mkdir()
        generate(tiny, 200_000, seed=1)
        baseline = run_ingest(args.kgrec, tiny / "spec.yaml", work / "tiny-out", env)
        result = run_ingest(args.kgrec, data / "spec.yaml", work / "out", env)
        report = result["report"]
        accepted = pl.read_parquet(Path(report["snapshot_dir"]) / "interactions.parquet").estimated_size()
        input_bytes = sum(p.stat().st_size for p in data.iterdir() if p.suffix in (".csv", ".tsv"))
        summary = {
            "machine": where,
            "command": f"{args.kgrec} ingest --spec {data / 'spec.yaml'} --out {work / 'out'} --json",
            "generated": generated,
            "input_bytes": input_bytes,
            "wall_s": round(result["wall_s"], 1),
            "peak_rss_bytes": result["peak_rss_bytes"],
            "baseline_rss_bytes": baseline["peak_rss_bytes"],
            "accepted_interactions": report["n_interactions"],
            "accepted_bytes": accepted,
            "rss_over_accepted": round(result["peak_rss_bytes"] / accepted, 2),
            "accounting": report.get("accounting"),
            "quarantined": report["quarantined"],
            "excluded": report["excluded"],
        }
    finally:
        if args.keep:
            print(f"kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(summary))
        return
    gb = 1e9
    print(f"machine: {where}")
    print(f"command: {summary['command']}")
    print(f"input: {input_bytes / gb:.3f} GB ({generated})")
    print(f"wall time: {summary['wall_s']} s")
    print(f"peak RSS of the child: {summary['peak_rss_bytes'] / gb:.3f} GB "
          f"(the same command on a tiny input: {summary['baseline_rss_bytes'] / gb:.3f} GB)")
    print(f"accepted interactions: {summary['accepted_interactions']:,} rows, "
          f"{accepted / gb:.3f} GB in memory (estimated_size)")
    print(f"peak RSS / accepted data: {summary['rss_over_accepted']}")
    print(f"quarantined: {summary['quarantined']}")
    print(f"excluded: {summary['excluded']}")
    for kind, counts in (summary["accounting"] or {}).items():
        total = counts["accepted"] + counts["quarantined"] + counts["excluded"]
        print(f"  {kind}: read {counts['read']} = accepted {counts['accepted']} + quarantined "
              f"{counts['quarantined']} + excluded {counts['excluded']}  ({'holds' if total == counts['read'] else 'BROKEN'})")


def _self_peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


if __name__ == "__main__":
    main()
