"""README "Your own data": its commands, run as written, on a generated log (fresh working folder,
embedded SQLite tracking; the service on a free port instead of the README's 8000)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from kgrec.serving.process import running_service

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- your-own-data:begin -->\n```bash\n(.*?)```\n<!-- your-own-data:end -->", text, re.S)
    assert block, "README.md lost its 'Your own data' block"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def write_log(path: Path) -> None:
    """300 customers in 4 taste groups, each rating 12 of its group's 25 products, with times."""
    path.parent.mkdir(parents=True)
    rows = ["customer_id,product_id,rating,ts"]
    for user in range(300):
        group = user % 4
        for k in range(12):
            product = group * 25 + (user * 7 + k * 3) % 25
            rows.append(f"c{user},p{product},{1 + (user + k) % 5},{1_700_000_000 + user * 100 + k}")
    path.write_text("\n".join(rows) + "\n")


def test_the_readme_walk_through_runs_as_written(tmp_path: Path) -> None:
    commands = readme_commands()
    assert [shlex.split(c)[1] if c.startswith(".venv") else shlex.split(c)[0] for c in commands] == [
        "spec", "spec", "pipeline", "serve", "curl"]
    write_log(tmp_path / "my-data" / "ratings.csv")
    env = {k: v for k, v in os.environ.items() if k not in ("KGREC_HOME", "MLFLOW_TRACKING_URI", "KGREC_TRACKING_URI")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    outputs = []
    for command in commands[:3]:
        argv = shlex.split(command)
        argv[0] = str(BIN / "kgrec")  # the README's .venv/bin/kgrec
        proc = subprocess.run([*argv, "--json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
        outputs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    init, check, pipeline = outputs
    spec_text = (tmp_path / "my-data" / "spec.yaml").read_text()
    assert 'user: "customer_id"' in spec_text and 'item: "product_id"' in spec_text and "kg:" not in spec_text
    assert check["dry_run"]["has_kg"] is False and check["dry_run"]["n_interactions"] == 3600
    assert pipeline["ingest"]["rows_read"] == {"interactions": 3600}
    assert [m["model"] for m in pipeline["models"]] == ["bprmf", "lightgcn"]
    # planted taste groups: far above chance (20 of 100 products)
    assert max(m["test"]["recall@20"] for m in pipeline["models"]) > 0.3

    serve = shlex.split(commands[3].rstrip("&"))
    model_name = serve[serve.index("--model-name") + 1]
    url = re.search(r"'http://127\.0\.0\.1:8000(/[^']*)'", commands[4]).group(1)
    with running_service(model_name, env=env | {"KGREC_HOME": str(tmp_path / "kgrec-work")}) as base_url:
        answer = httpx.get(base_url + url, timeout=30)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert len(body["candidates"]) == 5 and body["model"]["name"] == "kgrec-my-shop"
        assert httpx.get(base_url + "/v1/users/nobody/candidates", timeout=30).status_code == 404
