"""One model trained and tested outside the flow, on one process or data-parallel on several.

``kgrec train`` calls :func:`train_one`. Under ``torchrun`` (``kgrec train --nproc N`` re-executes
itself as ``python -m torch.distributed.run --standalone --nproc-per-node N -m kgrec.cli train``)
every rank joins the process group (:func:`kgrec.models.training.distributed.process_group`),
rank 0 ingests the dataset and the others wait for its snapshot, every rank trains its shard of
each batch, and rank 0 alone tracks: one MLflow run with ``world_size`` among its params, the
per-epoch metrics and the test metrics. It registers nothing: that is the pipeline's job
(``kgrec pipeline``), which compares a new version with the champion before promoting it.
"""

from __future__ import annotations

from typing import Any

from kgrec.features.ingest import ingest
from kgrec.features.spec import load_spec
from kgrec.models.families import PipelineInputs, family_of
from kgrec.models.spec import get_spec
from kgrec.models.tracking import registry
from kgrec.models.tracking.experiment import Trained, curve_config, evaluate_and_log, train_and_log
from kgrec.models.tracking.settings import TrackingSettings
from kgrec.models.training import distributed


def train_one(
    dataset: str,
    model: str,
    tracking: TrackingSettings,
    *,
    epochs: int | None = None,
    seed: int = 2020,
    split: str = "random",
    device: str | None = None,
    track: bool = True,
    time_cap_s: float | None = None,
) -> dict[str, Any] | None:
    """Train and test ``model`` on ``dataset``; rank 0 returns the summary, other ranks ``None``."""
    spec = get_spec(model)
    family = family_of(spec)
    config = family.config(spec, epochs=epochs, seed=seed, device=device, time_budget_s=time_cap_s)  # None: default
    with distributed.process_group(getattr(config, "device", "auto")):
        lead = distributed.rank() == 0
        world = distributed.world_size()
        # One writer of the snapshot: the other ranks read what rank 0 ingested.
        snapshot_dir = ingest(load_spec(dataset), tracking.snapshot_dir).snapshot_dir if lead else None
        snapshot_dir = distributed.broadcast(snapshot_dir)
        inputs = PipelineInputs(snapshot_dir, split, seed).for_family(spec.family)
        if lead and track:
            registry.configure_tracking(tracking)
            trained = train_and_log(spec, config, inputs, extra_params={"world_size": world})
            evaluate_and_log(trained)
            summary = trained.summary() | {"tracking_uri": tracking.resolved_tracking_uri}
        else:
            trained_model, fit = family.fit(spec, config, inputs)
            summary = None
            if lead:  # the same summary as a tracked run's, without a run
                trained = Trained(run_id=None, spec=spec, config=config, model=trained_model, fit=fit, inputs=inputs)
                trained.test_metrics = family.evaluate(trained_model, curve_config(config), inputs)
                summary = trained.summary()
        distributed.barrier()  # no rank leaves (and tears the group down) while rank 0 still logs
    if summary is not None:
        summary |= {"world_size": world, "dataset": dataset}
    return summary
