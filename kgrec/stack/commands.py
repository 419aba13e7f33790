"""``kgrec stack up | down | status``: argparse wiring (kgrec/cli.py calls add_stack_commands)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import ValidationError

from kgrec.stack.lifecycle import down, status, up
from kgrec.stack.processes import StackError
from kgrec.stack.settings import StackSettings

EXIT_ERROR = 2
#: `status` with a service down exits like `systemctl status` of an inactive unit.
EXIT_NOT_RUNNING = 3

PORT_OPTIONS = {"postgres": "--postgres-port", "s3": "--s3-port", "mlflow": "--mlflow-port",
                "prefect-server": "--prefect-port"}


def _settings(args: argparse.Namespace) -> StackSettings:
    ports = {name: getattr(args, flag.lstrip("-").replace("-", "_"), None) for name, flag in PORT_OPTIONS.items()}
    fields = {"ports": {k: v for k, v in ports.items() if v is not None}}
    if args.dir:
        fields["dir"] = Path(args.dir)
    if getattr(args, "s3_endpoint", None):
        fields["s3_endpoint"] = args.s3_endpoint
    if getattr(args, "timeout", None):
        fields["start_timeout_s"] = args.timeout
    return StackSettings(**fields)


def _run(action: str, args: argparse.Namespace) -> int:
    try:
        settings = _settings(args)
        result = {"up": up, "down": down, "status": status}[action](settings)
    except (StackError, ValidationError) as exc:
        print(f"kgrec stack {action}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        sys.stdout.write(json.dumps(result, default=str) + "\n")
        sys.stdout.flush()
    if action == "status" and not result["running"]:
        return EXIT_NOT_RUNNING
    return 0


def add_stack_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``stack`` with ``up``, ``down`` and ``status`` on the CLI's subparsers."""
    stack = subparsers.add_parser(
        "stack", help="local production stack: Postgres, S3 (moto), MLflow server, Prefect server + worker",
        description="Each service on a 127.0.0.1 port, all under one folder (default $KGREC_HOME/stack "
        "or ./kgrec-work/stack); `set -a; . <dir>/stack.env` points a shell at it.",
    )
    actions = stack.add_subparsers(dest="stack_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dir", help="stack folder (default: <workdir>/stack)")
        p.add_argument("--json", action="store_true", help="print one JSON object on the last line")

    p = actions.add_parser("up", help="start every service that is not running (idempotent)")
    common(p)
    for name, flag in PORT_OPTIONS.items():
        p.add_argument(flag, type=int, help=f"{name} port (default: stack.json's, else the default or next free)")
    p.add_argument("--s3-endpoint", help="external S3 (MinIO, AWS) instead of moto; env KGREC_S3_ENDPOINT; "
                   "credentials from the AWS_* variables")
    p.add_argument("--timeout", type=float, help="seconds each service gets to become ready (default 240)")
    p.set_defaults(func=lambda args: _run("up", args))

    p = actions.add_parser("down", help="stop every service (reverse order) and their child processes")
    common(p)
    p.set_defaults(func=lambda args: _run("down", args))

    p = actions.add_parser("status", help="each service's pid, port and state (exit 3 unless all run)")
    common(p)
    p.set_defaults(func=lambda args: _run("status", args))
    return stack
