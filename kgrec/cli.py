"""``kgrec`` command line: pipeline, tune, train, ingest, spec, serve, deploy.

Every command that does work accepts ``--json`` and then prints one JSON object with its figures on
its last stdout line; human-readable output and logs go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import polars.exceptions
import pyarrow
import yaml
from prefect.exceptions import TerminationSignal
from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings
from pydantic import ValidationError

from kgrec.features import spec_tools
from kgrec.features.ingest import accounting_line, ingest, kg_summary
from kgrec.features.spec import load_spec, parse_spec
from kgrec.flows.config import PipelineConfig, TuneConfig
from kgrec.flows.pipeline import configured_flow, run_pipeline
from kgrec.flows.pipeline import format_metric as _fmt
from kgrec.flows.tune import run_tune
from kgrec.models.spec import markdown_table, model_names
from kgrec.models.tracking.registry import state_since
from kgrec.models.tracking.settings import (
    TrackingSettings,
    default_workdir,
    registered_model_name,
    registered_ranker_name,
)
from kgrec.models.tracking.standalone import train_one
from kgrec.models.tracking.tuning import TuneSettings
from kgrec.models.training import distributed
from kgrec.serving.service import serve
from kgrec.serving.settings import DEFAULT_MAX_BODY_BYTES, ServeSettings
from kgrec.stack import add_stack_commands

DEFAULT_SERVE_MODEL = os.environ.get("KGREC_MODEL_NAME", "kgrec-music")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("alembic", "mlflow.store", "httpx", "urllib3", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # MLflow's advice on type hints does not apply to our bundle-backed pyfunc.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow\..*")
    logging.getLogger("mlflow.pyfunc").setLevel(logging.ERROR)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # No network beyond package registries: telemetry would only log connection errors.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect creates its home directory but not the parents of one set by PREFECT_HOME.
    if home := os.environ.get("PREFECT_HOME"):
        Path(home).expanduser().mkdir(parents=True, exist_ok=True)


def _tracking(args: argparse.Namespace):

    return TrackingSettings(
        workdir=Path(args.workdir).resolve() if args.workdir else default_workdir(),
        tracking_uri=args.tracking_uri,
    )


def _emit(result: dict[str, Any], as_json: bool, human: str) -> None:
    if as_json:
        sys.stdout.write(json.dumps(result, default=str) + "\n")
    else:
        sys.stdout.write(human + "\n")
    sys.stdout.flush()


#: Prefect's temporary server gets 20 s to start; the first start after an install (bytecode,
#: database migrations) on a busy 2-core machine took longer. An explicit setting still wins.
EPHEMERAL_STARTUP_SECONDS = 120


def prefect_startup_grace() -> contextlib.AbstractContextManager:
    if "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in os.environ:
        return contextlib.nullcontext()
    return temporary_settings({PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: EPHEMERAL_STARTUP_SECONDS})


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM reached the CLI (a KeyboardInterrupt, so that every cleanup that runs
    on Ctrl-C runs for both)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """SIGINT/SIGTERM set the returned event (training stops at its next optimiser step) and
    interrupt the main thread (whatever step runs there rolls back). Later signals are reported
    and ignored while the run cleans up: SIGKILL still forces an exit."""
    cancel, received = threading.Event(), threading.Event()

    def handler(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if received.is_set():
            print(f"kgrec: {name} again: still cleaning up (SIGKILL forces an exit)", file=sys.stderr)
            return
        received.set()
        cancel.set()
        print(f"kgrec: {name} received: stopping and rolling back", file=sys.stderr)
        raise Interrupted(signum)

    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield cancel
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _pipeline_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`PipelineConfig` fields of ``kgrec pipeline`` and ``kgrec tune``."""
    return dict(
        dataset=args.dataset,
        models=args.models.split(","),
        epochs=args.epochs,
        time_cap_s=args.time_cap,
        split=args.split,
        seed=args.seed,
        registered_model=args.registered_model,
        ranker=args.ranker,
        tracking=_tracking(args),
        progress=sys.stderr.isatty() and not args.json,
        **({"parallel_training": args.parallel} if args.parallel else {}),
        task_runner=args.task_runner,
        runner_address=args.runner_address,
        overlay=not args.no_overlay,
    )


def _cmd_pipeline(args: argparse.Namespace) -> int:
    return _run_flow(args, PipelineConfig(**_pipeline_fields(args), tuned=args.tuned), run_pipeline)


def _cmd_tune(args: argparse.Namespace) -> int:
    settings = TuneSettings(trials=args.trials, timeout_s=args.timeout, pruner=args.pruner)
    return _run_flow(args, TuneConfig(**_pipeline_fields(args), tune=settings), run_tune)


def _run_flow(args: argparse.Namespace, config: PipelineConfig, run: Any) -> int:
    """Run a flow under the CLI's signal handling; print its summary or what a cancel kept."""
    started_ms = int(time.time() * 1000)
    try:
        with prefect_startup_grace(), stop_on_signals() as cancel:
            result = run(config, cancel)
    except (KeyboardInterrupt, TerminationSignal) as exc:
        # Prefect turns a SIGTERM during a flow run into its own TerminationSignal.
        signum = getattr(exc, "signum", None) or getattr(exc, "signal", None) or signal.SIGINT
        kept = _what_was_kept(config, started_ms)
        _emit(
            {"status": "cancelled", "signal": signal.Signals(signum).name, "kept": kept},
            args.json,
            f"kgrec {args.command}: cancelled by {signal.Signals(signum).name}; {kept}",
        )
        return 128 + signum
    _emit(result, args.json, format_pipeline_summary(result))
    return 0


def _what_was_kept(config: PipelineConfig, since_ms: int) -> str:
    """One line on the registry after an interrupted run (versions it left, how its runs ended)."""
    try:
        # the flow's own naming: the spec's dataset name, not the spec file's
        name = config.registered_model or registered_model_name(load_spec(config.dataset).name)
        mlflow.set_tracking_uri(config.tracking.resolved_tracking_uri)
        return state_since([name, registered_ranker_name(name)], since_ms, config.tracking.experiment).kept()
    except Exception as exc:  # the store itself may be what failed
        return f"registry state unknown ({type(exc).__name__}: {exc})"


def format_pipeline_summary(result: dict[str, Any]) -> str:
    return _format_studies(result.get("studies", [])) + _format_pipeline(result)


def _format_studies(studies: list[dict[str, Any]]) -> str:
    lines = []
    for s in studies:
        best, trials = s["best"], s["trials"]
        lines += [
            "",
            f"kgrec tune: {s['model']}: {trials['complete']} trials complete, {trials['pruned']} pruned, "
            f"{trials['fail']} failed in {s['seconds']:.0f} s (stopped by {s['stop_reason']}); "
            f"best valid {best['metric']} {_fmt(best['value'])}; study run {s['study_run_id']}",
            "  best: " + ", ".join(f"{k}={_short(v)}" for k, v in best["params"].items()),
        ]
        if s["importances"]:
            lines.append("  importance: " + ", ".join(f"{k} {v:.2f}" for k, v in s["importances"].items()))
    return "\n".join(lines) + ("\n" if lines else "")


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _format_pipeline(result: dict[str, Any]) -> str:
    ingest = result["ingest"]
    quarantined = {
        f"{source}:{reason}": n
        for source, reasons in ingest["quarantined"].items()
        for reason, n in reasons.items()
    }
    width = max([11, *(len(m["model"]) for m in result["models"])])
    lines = [
        "",
        f"kgrec pipeline on {result['dataset']} (snapshot {result['snapshot_hash'][:12]})",
        f"  ingest: {ingest['rows_accepted']['interactions']:,} interactions accepted; "
        f"quarantined {sum(quarantined.values()):,} {quarantined or ''}; "
        f"excluded by policy {ingest['excluded']}",
        "",
        f"  {'model':<{width}} {'epochs':>6} {'best':>5} {'s/epoch':>8} {'valid (selection)':>19} "
        f"{'test R@20':>10} {'test R@50':>10} {'test N@20':>10} {'div@50':>7} {'version':>8}  alias",
    ]
    for m in result["models"]:
        reg = m["registered"]
        selection = m.get("selection_metric", "recall@20")
        valid = f"{_fmt(m['valid'].get(selection))} {selection.replace('recall', 'R')}"
        lines.append(
            f"  {m['model']:<{width}} {m['epochs_run']:>6} {m['best_epoch']:>5} "
            f"{m['seconds_per_epoch']:>8.3f} {valid:>19} "
            f"{_fmt(m['test'].get('recall@20')):>10} {_fmt(m['test'].get('recall@50')):>10} "
            f"{_fmt(m['test'].get('ndcg@20')):>10} {_fmt(m['test'].get('diversity@50')):>7} "
            f"{reg['version']:>8}  {reg['alias']}"
            + ("  (time cap: best epoch so far)" if m.get("stop_reason") == "time_budget" else "")
        )
    if ranker := result.get("ranker"):
        reg, test = ranker["registered"], ranker["test"]
        lines += [
            "",
            f"  ranking stage: {ranker['model']} re-ranks the top {ranker.get('num_candidates', 200)} of "
            f"{ranker['retriever']} (fusion alpha {ranker['alpha']:.1f}, chosen on validation); "
            f"{ranker['epochs_run']} epochs, best {ranker['best_epoch']}",
            f"    test R@20 {_fmt(test.get('retrieval_recall@20'))} -> {_fmt(test.get('recall@20'))}, "
            f"N@20 {_fmt(test.get('retrieval_ndcg@20'))} -> {_fmt(test.get('ndcg@20'))}; "
            f"{ranker['registered_model']} version {reg['version']} ({reg['alias']})",
        ]
    if "sequential_split" in result:
        split = result["sequential_split"]
        lines += [
            "",
            f"  sequential models: split by user (seed {split['seed']}): {split['train_users']} train, "
            f"{split['valid_users']} valid, {split['test_users']} test users; promoted on valid "
            "Recall@50 (div@50: share of genre-disjoint pairs in the top 50)",
        ]
    lines += [
        "",
        f"  champion: {result['registered_model']} version {result['champion_version']}",
        f"  tracking: {result['tracking_uri']}",
        "  MLflow UI: " + (
            f"open {result['tracking_uri']}" if result["tracking_uri"].startswith(("http://", "https://"))
            else f".venv/bin/mlflow ui --backend-store-uri {result['tracking_uri']}"
        ),
        f"  start the service: .venv/bin/kgrec serve --model-name {result['registered_model']}"
        " --host 127.0.0.1 --port 8000",
    ]
    return "\n".join(lines)


def _cmd_train(args: argparse.Namespace) -> int:
    if args.nproc > 1 and distributed.launched_world() == 1:
        # torchrun starts the ranks, each running this command less --nproc, and tears all of them
        # down when one fails; a SIGTERM to this process is passed on to it.
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
            "-m", "kgrec.cli", *_without_nproc(args.argv),
        ]
        launcher = subprocess.Popen(command)
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: launcher.send_signal(signum))
        try:
            return launcher.wait()
        finally:
            signal.signal(signal.SIGTERM, previous)
    summary = train_one(
        args.dataset, args.model, _tracking(args), epochs=args.epochs, seed=args.seed, split=args.split,
        device=args.device, track=not args.no_track, time_cap_s=args.time_cap,
    )
    if summary is not None:  # rank 0
        valid, test = summary["valid"], summary["test"]
        _emit(summary, args.json, (
            f"kgrec train: {summary['model']} on {args.dataset}, {summary['world_size']} process(es): "
            f"best epoch {summary['best_epoch']} of {summary['epochs_run']}"
            f"{' (time cap)' if summary.get('stop_reason') == 'time_budget' else ''}, "
            f"{summary['seconds_per_epoch']:.2f} s/epoch, valid recall@20 {_fmt(valid.get('recall@20'))}, "
            f"test recall@20 {_fmt(test.get('recall@20'))} ndcg@20 {_fmt(test.get('ndcg@20'))}"
            + (f"; MLflow run {summary['run_id']}" if summary.get("run_id") else "")
        ))
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    """``argv`` less its ``--nproc N`` / ``--nproc=N`` (the ranks must not launch again)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def _cmd_ingest(args: argparse.Namespace) -> int:
    report = ingest(load_spec(args.spec), Path(args.out), progress=sys.stderr.isatty() and not args.json)
    result = report.to_dict()
    human = "\n".join(f"{k}: {v}" for k, v in result.items() if k != "accounting")
    # The accounting identity, per source file: read = accepted + quarantined + excluded.
    human += "\naccounting:\n" + "\n".join(
        f"  {accounting_line(kind, counts)}" for kind, counts in report.accounting.items()
    )
    _emit(result, args.json, human)
    return 0


def _cmd_spec(args: argparse.Namespace) -> int:
    if args.spec_command == "schema":
        print(json.dumps(spec_tools.json_schema(), indent=2))
    elif args.spec_command == "docs":
        print(spec_tools.reference_markdown(), end="")
    elif args.spec_command == "init":
        out = Path(args.out)
        if out.exists() and not args.force:
            raise FileExistsError(f"{out} exists: pass --force to overwrite it")
        name = args.name or _spec_name(Path(args.files[0]))
        text, _ = spec_tools.draft_spec(args.files, name, out.parent, rows=args.rows)
        parse_spec(yaml.safe_load(text), source=str(out))  # a draft that does not validate is a bug
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        print(text, end="", file=sys.stderr)
        _emit({"spec": str(out), "name": name}, args.json, f"wrote {out}: check the guesses, then `kgrec spec check {out}`")
    else:
        result = spec_tools.check_spec(args.spec, rows=args.rows)
        dry = result["dry_run"]
        human = "\n".join(
            [f"{args.spec}: valid; files: " + ", ".join(f"{k}={v}" for k, v in result["files"].items()),
             f"dry run on the first {args.rows} rows of each file:",
             f"  {dry['n_interactions']} interactions, {dry['n_users']} users, {dry['n_items']} items, "
             + kg_summary(dry)]
            + [f"  {accounting_line(kind, counts)}" + (f" {dry['quarantined'][kind]}" if dry["quarantined"][kind] else "")
               for kind, counts in dry["accounting"].items()]
            + ([f"  excluded interactions: {dry['excluded']}"] if dry["excluded"] else [])
        )
        _emit(result, args.json, human)
    return 0


def _spec_name(path: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", path.stem).strip("-.") or "dataset"
    return name if name[0].isalnum() else f"d{name}"


def _cmd_serve(args: argparse.Namespace) -> int:
    settings = ServeSettings(
        tracking=_tracking(args),
        host=args.host,
        port=args.port,
        workers=args.workers,
        threads=args.threads,
        model_name=args.model_name,
        alias=args.alias,
        ranker_name=args.ranker_name,
        ranker_alias=args.ranker_alias,
        no_ranker=args.no_ranker,
        poll_interval_s=args.poll_interval,
        token_file=Path(args.token_file) if args.token_file else None,
        cors_origins=tuple(args.cors_origin),
        max_body_bytes=args.max_body_bytes,
        fail_fast=args.fail_fast,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        fresh_slots=args.fresh_slots,
        access_log=not args.no_access_log,
        log_format=args.log_format,
        log_level="debug" if args.verbose else "info",
    )
    serve(settings)
    return 0


def _cmd_deploy(args: argparse.Namespace) -> int:
    if not os.environ.get("PREFECT_API_URL"):
        raise ValueError(
            "a schedule needs a Prefect server (the ephemeral one cannot schedule): run "
            "`prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api"
        )

    config = PipelineConfig(
        dataset=args.dataset,
        models=args.models.split(","),
        epochs=args.epochs,
        ranker=args.ranker,
        tracking=_tracking(args),
    )
    # Prefect runs the deployment's schedule from this long-lived process (`flow.serve`).
    configured_flow(config).serve(
        name=args.name, cron=args.cron, parameters={"config": config.model_dump(mode="json")}
    )
    return 0


MODELS_HELP = (
    "comma-separated model names: "
    + ", ".join(model_names("retriever"))
    + " (retrievers, on the random/temporal split); "
    + ", ".join(model_names("sequential"))
    + " (sequential / multi-interest, on the sequential split). `kgrec models` describes each."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kgrec", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    def tracking_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--tracking-uri", help="MLflow tracking URI (default: SQLite in the workdir)")
        p.add_argument("--workdir", help="working directory (default: $KGREC_HOME or ./kgrec-work)")

    def pipeline_args(p: argparse.ArgumentParser, models: str = "bprmf,lightgcn") -> None:
        p.add_argument("--dataset", default="music", help="bundled spec name or path to a spec YAML")
        p.add_argument("--models", default=models, help=MODELS_HELP)
        p.add_argument("--epochs", type=int, help="maximum training epochs (default: per model)")
        p.add_argument("--time-cap", type=float, metavar="SECONDS", help="training seconds per model: "
                       "fitting stops after the epoch that passes it and the best validation epoch is "
                       "tested and registered, marked as capped")
        p.add_argument("--split", choices=["random", "temporal"], default="random",
                       help="split of the embedding retrievers (sequential models: sequential split)")
        p.add_argument("--seed", type=int, default=2020)
        p.add_argument("--registered-model", help="registered model name (default: kgrec-<dataset>)")
        p.add_argument("--ranker", choices=model_names("ranker"),
                       help="also train the ranking stage on the best retriever's top-200 and register "
                       "it as <registered model>-ranker")
        p.add_argument("--parallel", type=int, help="models trained at once (default: cores // 4); with "
                       "--task-runner dask and no address, the worker processes of the local cluster "
                       "(default there: one per model, at most one per CPU)")
        # Validated by PipelineConfig, so a bad $KGREC_TASK_RUNNER is reported like a bad option.
        p.add_argument("--task-runner", default=os.environ.get("KGREC_TASK_RUNNER") or "thread",
                       metavar="{thread,dask,ray}",
                       help="where the training tasks run: threads of this process, a Dask cluster (the "
                       "dask extra) or a Ray cluster (the ray extra) (default: $KGREC_TASK_RUNNER or thread)")
        p.add_argument("--runner-address", default=os.environ.get("KGREC_RUNNER_ADDRESS") or None,
                       help="an existing cluster: Dask scheduler tcp://host:8786, Ray ray://host:10001 "
                       "(default: $KGREC_RUNNER_ADDRESS, else a temporary local cluster)")
        p.add_argument("--no-overlay", action="store_true",
                       help="train on the ingested data only: leave out the items posted to the service "
                       "(POST /v1/items; merged in by default when the registered model has any)")
        p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
        tracking_args(p)

    p = sub.add_parser("pipeline", help="ingest → graph → train → evaluate → register → publish")
    pipeline_args(p)
    p.add_argument("--tuned", action="store_true", help="train each model with the configuration "
                   "`kgrec tune` recommended for this snapshot, where a study exists (else its defaults)")
    p.set_defaults(func=_cmd_pipeline)

    p = sub.add_parser("tune", help="Optuna studies (one MLflow parent run each, a child run per trial), "
                       "then the pipeline with the best configurations")
    pipeline_args(p, models="lightgcn")
    p.add_argument("--trials", type=int, default=TuneSettings.model_fields["trials"].default,
                   help="trials per model at most")
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="wall-clock seconds per model's study (default: no limit)")
    p.add_argument("--pruner", choices=["median", "hyperband", "none"], default="median",
                   help="stops unpromising trials on their per-epoch validation metric")
    p.set_defaults(func=_cmd_tune)

    p = sub.add_parser("train", help="train and test one model (data-parallel with --nproc); registers nothing")
    p.add_argument("--dataset", default="music", help="bundled spec name or path to a spec YAML")
    p.add_argument("--model", default="lightgcn", choices=model_names("retriever") + model_names("sequential"))
    p.add_argument("--epochs", type=int, help="maximum training epochs (default: per model)")
    p.add_argument("--time-cap", type=float, metavar="SECONDS",
                   help="training seconds: fitting stops after the epoch that passes it; the best epoch is tested")
    p.add_argument("--split", choices=["random", "temporal"], default="random")
    p.add_argument("--seed", type=int, default=2020)
    p.add_argument("--device", help='"cpu", "cuda", "cuda:N" (default: the model\'s, cuda when present)')
    p.add_argument("--nproc", type=int, default=1,
                   help="data-parallel processes on this machine, launched with torchrun (gloo on CPU, "
                   "NCCL on GPU: one GPU per process); under your own torchrun leave it out")
    p.add_argument("--no-track", action="store_true", help="no MLflow run: print the figures only")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    tracking_args(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("models", help="the registered models, as a Markdown table")
    p.set_defaults(func=lambda args: print(markdown_table()) or 0)

    p = sub.add_parser("ingest", help="validate and snapshot a dataset")
    p.add_argument("--spec", required=True, help="bundled spec name or path to a spec YAML")
    p.add_argument("--out", default="kgrec-work/snapshots", help="snapshot directory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("spec", help="dataset specs: draft one from your files, check it, its reference")
    spec_sub = p.add_subparsers(dest="spec_command", required=True)
    q = spec_sub.add_parser("init", help="draft a commented spec from raw files (inspected with polars)")
    q.add_argument("files", nargs="+", help="the interaction log, and optionally link, KG and item-name files")
    q.add_argument("--out", default="spec.yaml", help="where to write the draft (default: ./spec.yaml)")
    q.add_argument("--name", help="dataset name (default: from the first file's name)")
    q.add_argument("--rows", type=int, default=1000, help="rows sampled per file")
    q.add_argument("--force", action="store_true", help="overwrite --out")
    q.add_argument("--json", action="store_true")
    q = spec_sub.add_parser("check", help="validate a spec and dry-run ingestion on the first rows")
    q.add_argument("spec", help="bundled spec name or path to a spec YAML")
    q.add_argument("--rows", type=int, default=10_000, help="rows read per file")
    q.add_argument("--json", action="store_true")
    spec_sub.add_parser("schema", help="the spec's JSON Schema (for editors)")
    spec_sub.add_parser("docs", help="the spec reference in Markdown (docs/dataset-spec.md)")
    p.set_defaults(func=_cmd_spec)

    p = sub.add_parser("serve", help="candidate-retrieval service for a registered model")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=DEFAULT_SERVE_MODEL)
    p.add_argument("--alias", default="champion")
    p.add_argument("--ranker-name",
                   help="registered ranking model for GET /v1/users/{id}/ranked (default: "
                   "<model-name>-ranker when it is registered)")
    p.add_argument("--ranker-alias", default="champion")
    p.add_argument("--no-ranker", action="store_true", help="serve retrieval only")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes (each gets CPU quota / N torch and faiss threads)")
    p.add_argument("--threads", type=int, help="torch and faiss threads per worker (default: quota / workers)")
    p.add_argument("--poll-interval", type=float, default=30.0, metavar="SECONDS",
                   help="how often the registry is asked whether the alias moved (0: never; "
                   "POST /admin/reload reloads at once)")
    p.add_argument("--token-file", help="file holding the bearer token (or set $KGREC_SERVE_TOKEN); needed "
                   "for /admin/* and, beyond loopback, for every endpoint but the health probes")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow this origin (repeatable); CORS is off without one")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help="larger request bodies are answered 413")
    p.add_argument("--fail-fast", action="store_true",
                   help="exit non-zero when the model cannot be loaded at start (default: stay up, "
                   "answer 503 and keep polling the registry)")
    p.add_argument("--cache-dir", help="serve cache of downloaded versions (default: <workdir>/serve-cache)")
    p.add_argument("--fresh-slots", type=int, default=0, metavar="N",
                   help="of each candidate list, up to N slots go to items posted since training "
                   "(POST /v1/items) that the ranking would leave out; a request's ?fresh= overrides")
    p.add_argument("--log-format", choices=["json", "text"], default="json")
    p.add_argument("--no-access-log", action="store_true", help="no access-log line per request")
    tracking_args(p)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("deploy", help="serve the pipeline flow as a Prefect deployment on a cron")
    p.add_argument("--cron", default="0 3 * * *")
    # distinct from infra/prefect.yaml's work-pool deployment (kgrec-pool-nightly)
    p.add_argument("--name", default="kgrec-serve-nightly")
    p.add_argument("--dataset", default="music")
    p.add_argument("--models", default="bprmf,lightgcn", help=MODELS_HELP)
    p.add_argument("--epochs", type=int)
    p.add_argument("--ranker", choices=model_names("ranker"))
    tracking_args(p)
    p.set_defaults(func=_cmd_deploy)
    add_stack_commands(sub)  # kgrec stack up | down | status (kgrec/stack/)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except (ValidationError, ValueError, FileNotFoundError, FileExistsError, LookupError) as exc:
        if args.verbose:
            logging.getLogger("kgrec").exception("kgrec %s failed", args.command)
        return _fail(args, exc, 2)
    except Exception as exc:
        if args.verbose:
            logging.getLogger("kgrec").exception("kgrec %s failed", args.command)
        # A reader error on bad input data (polars, pyarrow) is a usage error, not a crash.
        data_error = isinstance(exc, (polars.exceptions.PolarsError, pyarrow.ArrowException))
        return _fail(args, exc, 2 if data_error else 1)


def _fail(args: argparse.Namespace, exc: BaseException, code: int) -> int:
    """One line on stderr (the traceback with -v) and, with --json, one JSON object on stdout."""
    message = f"{type(exc).__name__}: {exc}" if code == 1 else str(exc)
    hint = "" if code == 2 or args.verbose else " (-v for the traceback)"
    print(f"kgrec {args.command}: error: {message}{hint}", file=sys.stderr)
    if getattr(args, "json", False):
        _emit({"status": "failed", "error": message}, True, "")
    return code


if __name__ == "__main__":
    sys.exit(main())
