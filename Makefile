# Two commands for a newcomer:  `make demo`  (set up + run the whole pipeline)  and  `make test`.
# Both create or refresh the virtual environment first; that step is a no-op when nothing changed.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kgrec-installed
# Where no GPU is present we install the CPU build of torch first, so that no dependency pulls
# the multi-GB CUDA build. Elsewhere set e.g. TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
DATASET ?= music
PYTEST_ARGS ?=

.PHONY: setup demo demo-full test test-all bench serve lint lock clean postgres stack-up stack-down \
	dgl-env test-dgl dgl-lock

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "kgrec needs $(PYTHON) (Python 3.11)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if ! command -v nvidia-smi >/dev/null 2>&1; then \
		echo "setup: no GPU found, installing the CPU build of torch"; \
		$(PY) -m pip install -q $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) "$(TORCH_SPEC)"; \
	fi
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,stack]'
	@touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/kgrec pipeline --dataset $(DATASET)

# Every retriever family plus the ranking stage (KGAT, then KCAN starting from it): ~5 min on 2 cores.
demo-full: setup
	$(VENV)/bin/kgrec pipeline --dataset $(DATASET) --models bprmf,lightgcn,kgat --ranker kcan

# `kgrec stack` (and `pytest -m stack`) runs the machine's PostgreSQL server binaries. As root with
# apt-get (CI: a fresh Debian machine) this installs them when none are found; else it says so.
PG_FOUND = test -x "$$(pg_config --bindir 2>/dev/null)/initdb" || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1

postgres:
	@if ! { $(PG_FOUND); }; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "postgres: no PostgreSQL server binaries found; running: apt-get install -y --no-install-recommends postgresql"; \
			apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql; \
		else \
			echo "postgres: no PostgreSQL server binaries found (not root with apt-get): install postgresql for the stack tests"; \
		fi; \
	fi

# The default suite, then the stack suite (real Postgres, MLflow, moto S3, Prefect server + worker;
# ~5 min on 2 cores). Exit status 5 = PYTEST_ARGS selected no stack test.
test: setup postgres
	$(PY) -m pytest $(PYTEST_ARGS)
	$(PY) -m pytest -m stack $(PYTEST_ARGS) || [ $$? -eq 5 ]

stack-up: setup postgres
	$(VENV)/bin/kgrec stack up

stack-down: setup
	$(VENV)/bin/kgrec stack down

test-all: setup
	$(PY) -m pytest -m "" $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/quality.py
	$(PY) benchmarks/speed.py

serve: setup
	$(VENV)/bin/kgrec serve

lock: setup
	$(PY) -m pip freeze --exclude-editable | sed 's/+cpu$$//' > constraints.txt.new && mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) kgrec-work

lint: setup
	$(VENV)/bin/ruff check .

# The optional DGL backend (README, "DGL backend"): its own environment, never part of `make test`.
# dgl 2.1.0 (the newest on PyPI) has native libraries for torch 2.0.0 - 2.2.1 only, and PyPI's
# torch 2.2.1 is the CUDA build: the first run downloads ~3 GB of nvidia-* wheels, on a GPU-less
# machine too. kgrec goes in with --no-deps (its pyproject asks for torch>=2.6); its runtime
# dependencies come from infra/dgl/requirements.txt, pinned by infra/dgl/constraints.txt.
DGL_VENV ?= .venv-dgl
DGL_PY := $(DGL_VENV)/bin/python
DGL_STAMP := $(DGL_VENV)/.kgrec-dgl-installed

$(DGL_STAMP): pyproject.toml infra/dgl/requirements.txt infra/dgl/constraints.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "dgl-env needs $(PYTHON) (Python 3.11)"; exit 1; }
	@test -x $(DGL_PY) || $(PYTHON) -m venv $(DGL_VENV)
	$(DGL_PY) -m pip install -q -r infra/dgl/requirements.txt -c infra/dgl/constraints.txt
	$(DGL_PY) -m pip install -q --no-deps -e .
	DGLBACKEND=pytorch $(DGL_PY) -c "import dgl, torch, kgrec.models.backends.dgl; print('dgl-env: dgl', dgl.__version__, 'torch', torch.__version__)"
	@touch $(DGL_STAMP)

dgl-env: $(DGL_STAMP)

# Re-pin infra/dgl/constraints.txt from what .venv-dgl resolved (after editing requirements.txt).
dgl-lock: dgl-env
	{ echo "# Tested set of .venv-dgl (make dgl-env): the core's pins (constraints.txt) where they fit, torch"; \
	  echo "# 2.2.1 (PyPI's CUDA build) with its nvidia-* and triton, numpy 1.26, pandas 3.0, dgl, torchdata."; \
	  echo "# Regenerate after editing infra/dgl/requirements.txt: make dgl-lock"; \
	  $(DGL_PY) -m pip freeze --exclude-editable; } > infra/dgl/constraints.txt.new && \
	  mv infra/dgl/constraints.txt.new infra/dgl/constraints.txt

test-dgl:
	@test -f $(DGL_STAMP) || { echo "test-dgl: $(DGL_VENV) is missing or incomplete; create it first with: make dgl-env"; exit 1; }
	DGLBACKEND=pytorch $(DGL_PY) -m pytest -m dgl tests/dgl $(PYTEST_ARGS)
