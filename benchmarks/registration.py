"""Cost of registering one model, and what the MLflow-facing parts of it add.

One bprmf model is trained once on ``--dataset`` (default music, 3 epochs), then three ways of logging it run interleaved,
in rotating order, ``--repeats`` times each, in the same process against the same embedded store:

* ``log_model``: the models-from-code pyfunc with staged code and pinned requirements, no input
  example (the baseline);
* ``log_model+example``: the same with the input example, which MLflow validates by loading the
  logged model and predicting;
* ``register_trained``: what the pipeline does: bundle export, the run's three plots (one of them
  serves 500 users through the bundle), the model with its example, and a registered version.

Prints the median seconds of each and its ratio to the baseline measured in this run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/registration.py [--repeats 5] [--dataset SPEC] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import mlflow
import torch
from kgrec.features.ingest import ingest
from kgrec.features.spec import load_spec
from kgrec.models.families import PipelineInputs, family_of
from kgrec.models.spec import get_spec
from kgrec.models.tracking import registry
from kgrec.models.tracking.experiment import evaluate_and_log, train_and_log
from kgrec.models.tracking.settings import TrackingSettings
from kgrec.serving.export import export_bundle, register_trained
from kgrec.serving.pyfunc import log_bundle_model
from quality import machine  # noqa: E402  (sibling script)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dataset", default="music", help="bundled spec name or spec YAML path")
    parser.add_argument("--workdir", type=Path, help="store, snapshots and bundles (default: a temp dir)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    where = machine()  # before anything can change the thread count
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    with tempfile.TemporaryDirectory(prefix="kgrec-bench-reg-") as tmp:
        work = args.workdir or Path(tmp)
        tracking = TrackingSettings(workdir=work, tracking_uri=None)
        registry.configure_tracking(tracking)
        report = ingest(load_spec(args.dataset), tracking.snapshot_dir)
        spec = get_spec("bprmf")
        inputs = PipelineInputs(report.snapshot_dir, "random", 2020).for_family(spec.family)
        trained = train_and_log(spec, family_of(spec).config(spec, epochs=3, seed=2020), inputs)
        evaluate_and_log(trained)
        bundle_dir = export_bundle(trained, work / "bundles")

        def log_model(example: bool) -> None:
            with mlflow.start_run(run_id=trained.run_id):
                log_bundle_model(bundle_dir, trained.name, example=example)

        variants = {
            "log_model": lambda: log_model(False),
            "log_model+example": lambda: log_model(True),
            "register_trained": lambda: register_trained(trained, work / f"bundles-{time.monotonic_ns()}", "bench"),
        }
        names = list(variants)
        seconds: dict[str, list[float]] = {name: [] for name in names}
        for repeat in range(args.repeats):
            for name in names[repeat % len(names):] + names[: repeat % len(names)]:  # rotate the order
                torch.set_num_threads(1)  # training restores the thread count it found
                started = time.perf_counter()
                variants[name]()
                seconds[name].append(time.perf_counter() - started)
    baseline = statistics.median(seconds["log_model"])
    result = {
        "machine": where,
        "torch_threads": 1,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "repeats": args.repeats,
        "median_seconds": {n: round(statistics.median(s), 3) for n, s in seconds.items()},
        "min_max_seconds": {n: [round(min(s), 3), round(max(s), 3)] for n, s in seconds.items()},
        "ratio_to_log_model": {n: round(statistics.median(s) / baseline, 2) for n, s in seconds.items()},
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"machine: {result['machine']}; torch threads {result['torch_threads']}, "
          f"OMP_NUM_THREADS={result['omp_num_threads']}; {args.repeats} interleaved repeats")
    for name in names:
        low, high = result["min_max_seconds"][name]
        print(f"  {name:<18} median {result['median_seconds'][name]:6.3f} s  (min {low:.3f}, max {high:.3f})"
              f"  x{result['ratio_to_log_model'][name]:.2f} of log_model")


if __name__ == "__main__":
    main()
