"""Fuzz: schemathesis against the live service's /openapi.json; fails on any 5xx or schema violation.

1. Unless ``--workdir`` already holds a registry (``mlflow.db``), registers ``kgrec-<dataset>`` and its
   ranker in a fresh working directory (``kgrec pipeline --dataset DATASET --models bprmf,lightgcn
   --epochs 3 --ranker kcan``), so that the two-stage endpoints answer too (without a ranker they
   answer 503 by design: ``--no-ranker`` serves retrieval only and leaves them out of the run).
2. schemathesis (pinned, :data:`SCHEMATHESIS`) lives in its own virtual environment, ``--venv``
   (default ``benchmarks/.venv``, git-ignored), created on first use: it talks to the service over HTTP
   only, and installing it into ``.venv`` would add hypothesis, pytest plugins and friends to the
   tested dependency set (``constraints.txt``) that the service runs on.
3. ``kgrec serve`` on a free loopback port, one worker, ``--poll-interval 0``, with a random bearer
   token; every schemathesis request carries ``Authorization: Bearer <token>``, so ``/admin/reload``
   is exercised too (schemathesis's ``ignored_auth`` check drops the header to see the 401).
4. ``st run <url>/openapi.json --checks all`` with a generated ``schemathesis.toml``: dictionaries of
   known user and item ids (200 of each from the snapshot, seed 0) that path ``user_id`` / ``item_id``
   and the posted ``item_ids`` draw from half of the time (random ids alone are unknown: every
   answer would be a 404 and no 200 body would be checked against its schema), and the per-operation
   exceptions of :data:`EXPECTED_STATUSES`, each with why. Bounded: ``--max-examples`` test cases per
   operation and phase, a fixed ``--seed``, a ``--time-limit`` on the whole run (schemathesis is
   killed past it, and that counts as a failure).

Prints the requests sent, the answers by status, the 5xx answers and every failing check (check,
operation, count, one request and its answer); exits 1 when there is any (2 when the run itself
broke). Reports (JUnit XML, NDJSON events, the VCR cassette of every request), schemathesis's output
and the service log go to ``--out``.

    .venv/bin/python benchmarks/fuzz.py [--max-examples 100] [--time-limit 1200] [--workdir DIR]
        [--model-name NAME] [--no-ranker] [--out DIR] [--venv DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

HERE = Path(__file__).resolve().parent
SCHEMATHESIS = "schemathesis==4.32.5"

#: Checks of ``--checks all`` that are switched off entirely, and why. None: exceptions are scoped
#: to one operation instead (EXPECTED_STATUSES).
EXCLUDED_CHECKS: dict[str, str] = {}

#: (operation, check) -> (statuses that pass the check there, why). Each is deliberate behaviour.
EXPECTED_STATUSES: dict[tuple[str, str], tuple[list[str], str]] = {
    ("POST /v1/candidates", "positive_data_acceptance"): (
        ["2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx"],
        "a history none of whose items is known (e.g. [\"\"]) is schema-valid but answered 422 by design "
        "(service docstring: 'all posted items unknown 422'; the 422 is declared): the schema cannot say "
        "'a known item id'. Unknown items beside known ones are accepted (unknown_item_ids).",
    ),
    ("GET /v1/users/{user_id}/ranked", "positive_data_acceptance"): (
        ["2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx"],
        "k > n (e.g. ?k=999&n=1) is answered 422 by design: k of the n re-ranked candidates cannot exceed "
        "n, a constraint between two parameters that OpenAPI cannot express (it is in k's description). "
        "The defaults never contradict each other (k defaults to min(20, n)); unknown users are 404.",
    ),
}


def st_binary(venv: Path) -> Path:
    """``st`` of the fuzz venv, created (``python -m venv`` + pip install SCHEMATHESIS) when missing."""
    st = venv / "bin" / "st"
    if st.exists():
        return st
    print(f"creating {venv} with {SCHEMATHESIS} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", SCHEMATHESIS], check=True)
    return st


def st_version(st: Path) -> str:
    return subprocess.run([str(st), "--version"], capture_output=True, text=True).stdout.strip()


def toml_list(values: list) -> str:
    return "[" + ", ".join(json.dumps(str(v)) for v in values) + "]"


def write_config(path: Path, workdir: Path, dataset: str, seed: int) -> dict:
    """schemathesis.toml: dictionaries of known ids, the bindings that draw from them, the exceptions."""
    import numpy as np
    import polars as pl

    snapshot = sorted((workdir / "snapshots").glob(f"{dataset}-*"))[-1]
    rng = np.random.default_rng(seed)
    users = pl.read_parquet(snapshot / "users.parquet")["user_id"].to_list()
    items = pl.read_parquet(snapshot / "items.parquet")["item_id"].to_list()
    users = [users[i] for i in rng.permutation(len(users))[:200]]
    items = [items[i] for i in rng.permutation(len(items))[:200]]
    lines = ["# written by benchmarks/fuzz.py", "[dictionaries.users]", f"values = {toml_list(users)}", "",
             "[dictionaries.items]", f"values = {toml_list(items)}", "", "[parameters]",
             '"path.user_id" = { dictionary = "users", probability = 0.5 }',
             '"path.item_id" = { dictionary = "items", probability = 0.5 }',
             '"body.item_ids[*]" = { dictionary = "items", probability = 0.5 }', ""]
    for (operation, check), (statuses, why) in EXPECTED_STATUSES.items():
        lines += [f"# {why}", "[[operations]]", f"include-name = {json.dumps(operation)}",
                  f"checks.{check}.expected-statuses = {toml_list(statuses)}", ""]
    path.write_text("\n".join(lines))
    return {"known_users": len(users), "known_items": len(items)}


def run_schemathesis(st: Path, config: Path, base_url: str, token: str, args: argparse.Namespace,
                     out: Path) -> tuple[int, str, float]:
    cmd = [str(st), "--config-file", str(config), "run", f"{base_url}/openapi.json",
           "--checks", "all", "--max-examples", str(args.max_examples), "--seed", str(args.seed),
           "--workers", str(args.workers), "--request-timeout", "30", "--no-color",
           "--header", f"Authorization: Bearer {token}",
           "--generation-database", "none", "--continue-on-failure",
           "--report", "junit,ndjson,vcr", "--report-dir", str(out),
           "--output-sanitize", "true"]
    if EXCLUDED_CHECKS:
        cmd += ["--exclude-checks", ",".join(EXCLUDED_CHECKS)]
    if args.phases:
        cmd += ["--phases", args.phases]
    if args.no_ranker:  # 503 by design without a ranker
        cmd += ["--exclude-path-regex", "/ranked$|^/v1/latency$"]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.time_limit)
        code, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, text = 124, f"{exc.stdout or ''}{exc.stderr or ''}\nschemathesis killed after {args.time_limit} s"
    return code, text, time.perf_counter() - started


def route_of(paths: list[str]):
    """``/v1/users/7/candidates`` -> ``/v1/users/{user_id}/candidates`` (the schema's templates)."""
    patterns = [(re.compile("^" + re.sub(r"\\{[^/]+?\\}", "[^/]*", re.escape(p)) + "$"), p)
                for p in sorted(paths, key=lambda p: (p.count("{"), -len(p)))]

    def route(path: str) -> str:
        return next((template for pattern, template in patterns if pattern.match(path)), path)

    return route


def cassette_figures(out: Path, paths: list[str]) -> dict:
    """From the VCR cassette (one entry per request sent): requests, statuses, 5xx answers and the
    failing checks, each with its first request and answer."""
    import yaml

    statuses: Counter[int] = Counter()
    server_errors: list[str] = []
    failing: dict[tuple[str, str, str], dict] = {}
    by_operation: dict[str, Counter[int]] = {}
    route = route_of(paths)
    for cassette in sorted(out.glob("*.yaml")):
        with cassette.open() as stream:
            interactions = yaml.load(stream, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))["http_interactions"]
        for entry in interactions or []:
            request, response = entry["request"], entry.get("response") or {}
            code = int(response["status"]["code"]) if response else 0
            statuses[code] += 1
            method, path = request["method"], route(unquote(urlsplit(request["uri"]).path))
            by_operation.setdefault(f"{method} {path}", Counter())[code] += 1
            body = (request.get("body") or {}).get("string")
            answer = ((response.get("body") or {}).get("string") or "")[:300]
            if code >= 500:
                server_errors.append(f"{code} {method} {request['uri']} body={body!r:.200} -> {answer}")
            for check in entry.get("checks") or []:
                if check["status"] != "FAILURE":
                    continue
                key = (check["name"], method, path)
                seen = failing.setdefault(key, {"check": check["name"], "method": method, "path": path, "count": 0,
                                                "message": check.get("message"), "uri": request["uri"],
                                                "body": body, "status": code, "answer": answer})
                seen["count"] += 1
    return {"requests": sum(statuses.values()), "statuses": dict(sorted(statuses.items())),
            "server_errors": server_errors, "failing_checks": list(failing.values()),
            "by_operation": {op: dict(sorted(c.items())) for op, c in sorted(by_operation.items())}}


def junit_failures(out: Path) -> list[dict]:
    """Every failing check of the JUnit report: operation and the message schemathesis wrote."""
    import xml.etree.ElementTree as ET

    failures = []
    for junit in sorted(out.glob("*.xml")):
        for case in ET.parse(junit).getroot().iter("testcase"):
            for kind in ("failure", "error"):
                for node in case.findall(kind):
                    failures.append({"operation": case.get("name"), "kind": kind,
                                     "message": (node.get("message") or node.text or "").strip()})
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-examples", type=int, default=100, help="test cases per operation and phase")
    parser.add_argument("--time-limit", type=float, default=1200, help="seconds for the whole schemathesis run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", default="1", help="schemathesis workers (1: the service has the other core)")
    parser.add_argument("--phases", help="schemathesis phases (default: all of them)")
    parser.add_argument("--no-ranker", action="store_true", help="serve retrieval only, leave the two-stage "
                        "endpoints out (they answer 503 without a ranker)")
    parser.add_argument("--dataset", default="music")
    parser.add_argument("--epochs", type=int, default=3, help="epoch cap of the pipeline run")
    parser.add_argument("--workdir", type=Path, help="KGREC_HOME holding the registry (trained there when it has none)")
    parser.add_argument("--model-name", help="default: kgrec-<dataset>")
    parser.add_argument("--venv", type=Path, default=HERE / ".venv", help="schemathesis's own virtual environment")
    parser.add_argument("--out", type=Path, help="reports and serve.log (default: a temporary directory, removed)")
    args = parser.parse_args()
    name = args.model_name or f"kgrec-{args.dataset}"

    from kgrec.serving.process import workdir_env
    from soak import machine, register, serving  # noqa: E402  (sibling script)

    st = st_binary(args.venv.resolve())
    with tempfile.TemporaryDirectory() as tmp:
        workdir = (args.workdir or Path(tmp) / "work").resolve()
        out = (args.out or Path(tmp) / "out").resolve()
        out.mkdir(parents=True, exist_ok=True)
        for old in [*out.glob("*.yaml"), *out.glob("*.xml"), *out.glob("*.ndjson")]:
            old.unlink()
        figures: dict = {"machine": machine(), "schemathesis": st_version(st), "max_examples": args.max_examples,
                         "seed": args.seed, "excluded_checks": EXCLUDED_CHECKS,
                         "expected_statuses": {f"{op} {check}": statuses
                                               for (op, check), (statuses, _) in EXPECTED_STATUSES.items()}}
        if not (workdir / "mlflow.db").exists():
            figures["pipeline"] = register(workdir, args.dataset, name, args.epochs,
                                           None if args.no_ranker else "kcan")
            print(f"registered {name} in {workdir}: {figures['pipeline']}", flush=True)
        token = secrets.token_urlsafe(24)
        env = workdir_env(workdir) | {"KGREC_SERVE_TOKEN": token, "OMP_NUM_THREADS": "1"}
        config = out / "schemathesis.toml"
        figures |= write_config(config, workdir, args.dataset, args.seed)
        serve_args = ("--poll-interval", "0", *(("--no-ranker",) if args.no_ranker else ()))
        with serving(name, env, out / "serve.log", serve_args) as (base_url, _):
            schema = httpx.get(f"{base_url}/openapi.json").json()
            figures["operations"] = sum(len([m for m in ops if m in {"get", "post", "put", "delete", "patch", "head"}])
                                        for ops in schema["paths"].values())
            ready = httpx.get(f"{base_url}/readyz").json()["model"]
            figures["served"] = {"name": ready.get("name"), "version": ready.get("version"),
                                 "model": ready.get("model"), "ranker": (ready.get("ranker") or {}).get("name")}
            code, text, seconds = run_schemathesis(st, config, base_url, token, args, out)
        figures["serve_log_tracebacks"] = (out / "serve.log").read_text().count("Traceback")
        (out / "schemathesis.txt").write_text(text)
        figures |= {"exit_code": code, "seconds": round(seconds, 1), **cassette_figures(out, list(schema["paths"]))}
        failures = junit_failures(out)
        figures["junit_failures"] = failures
        figures["server_errors_total"] = len(figures["server_errors"])
        figures["violations_total"] = sum(f["count"] for f in figures["failing_checks"])

    at = text.find("== SUMMARY ==")
    summary = text[text.rfind("\n", 0, at) + 1:] if at >= 0 else text[-6000:]
    print(summary.strip())
    print(f"\nmachine: {figures['machine']}; {figures['schemathesis']}; {figures['operations']} operations, "
          f"--max-examples {args.max_examples}, seed {args.seed}, {figures['seconds']} s")
    print(f"requests sent: {figures['requests']}; statuses: {figures['statuses']}")
    probes: Counter[int] = Counter()
    for op, counts in figures["by_operation"].items():
        method, path = op.split(" ", 1)
        if method.lower() in schema["paths"].get(path, {}):
            print(f"  {op}: {counts}")
        else:  # unsupported_method's probes of the methods a path does not declare
            probes.update(counts)
    print(f"  undeclared methods (unsupported_method probes): {dict(probes)}")
    print(f"5xx answers: {figures['server_errors_total']}; failing checks: {figures['violations_total']}; "
          f"tracebacks in the service log: {figures['serve_log_tracebacks']}")
    for e in figures["server_errors"][:20]:
        print(f"  5xx: {e[:500]}")
    for f in figures["failing_checks"]:
        print(f"  FAIL {f['check']} on {f['method']} {f['path']} ({f['count']}x): {f['message']}\n"
              f"       e.g. {f['method']} {f['uri'][:300]} body={f['body']!r:.300} -> {f['status']} {f['answer'][:300]}")
    print(json.dumps(figures))
    if code not in (0, 1):
        raise SystemExit(2)
    raise SystemExit(1 if figures["server_errors_total"] or figures["violations_total"] or failures or code else 0)


if __name__ == "__main__":
    main()
