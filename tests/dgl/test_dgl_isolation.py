"""The core never imports DGL, and .venv-dgl's requirement list stays in step with pyproject.toml.

Marked ``dgl`` and not skipped: these run in the default suite (no DGL installed) and under
``make test-dgl``, where DGL is installed and the import check means the most.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.dgl

ROOT = Path(__file__).resolve().parents[2]

#: The core's entry points: the CLI, the flows, the service, training and the registry's scan
#: (which imports ``kgrec.models.backends`` and every model file).
PROBE = """
import json, sys
import kgrec.cli, kgrec.flows.pipeline, kgrec.serving.service, kgrec.serving.export
import kgrec.models.training.trainer, kgrec.models.tracking.experiment
import kgrec.models.backends.dgl
from kgrec.models.spec import model_specs
names = [s.name for s in model_specs()]
print(json.dumps({"dgl": sorted(m for m in sys.modules if m == "dgl" or m.startswith("dgl.")),
                  "models": names}))
"""


def test_importing_the_core_never_imports_dgl() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=240, cwd=ROOT, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["dgl"] == [], f"the core imported {found['dgl'][:5]}"
    assert "rgcn" in found["models"]


def requirement_names(lines: list[str]) -> set[str]:
    names = set()
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def test_the_dgl_requirements_list_every_runtime_dependency() -> None:
    """``make dgl-env`` installs kgrec with --no-deps: its dependencies come from this list."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = requirement_names(project)
    listed = requirement_names((ROOT / "infra" / "dgl" / "requirements.txt").read_text().splitlines())
    assert wanted - listed == set(), "infra/dgl/requirements.txt misses pyproject dependencies"
    assert {"torch", "dgl", "torchdata", "numpy"} <= listed
