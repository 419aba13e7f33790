"""``kgrec stack``: a local production stack without containers.

PostgreSQL (the machine's server binaries), an S3 server (moto, or an external endpoint), an MLflow
tracking server on Postgres with artefacts proxied to the bucket, a Prefect server on Postgres and a
process worker polling the ``kgrec-pool`` work pool: each a detached process on a 127.0.0.1 port
with a pid file and a log under one stack folder. Only kgrec/cli.py imports this package.
"""

from kgrec.stack.commands import add_stack_commands
from kgrec.stack.lifecycle import down, status, up
from kgrec.stack.processes import StackError
from kgrec.stack.settings import StackSettings

__all__ = ["StackError", "StackSettings", "add_stack_commands", "down", "status", "up"]
