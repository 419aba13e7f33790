"""Speed of the relational retrievers (issue 19, part 2): R-GCN and HGT, old layer vs grouped
layer, against KGAT, on the benchmark protocol's data (``ml-100k`` by default).

Each model is built with its registered defaults (``TrainConfig.for_model``, batch grown for the
data as in training) and only ``conv_impl`` differs between old and new:

* R-GCN old: ``conv_impl="fast"`` (PyG's ``FastRGCNConv``, the previous default for blocks);
  new: ``"grouped"`` (``GroupedRGCNConv``, the default now).
* HGT old: ``conv_impl="einsum"`` (``RelationGroupedHGTConv``, the previous default); new:
  ``"grouped"`` (``GroupedHGTConv``). ``--with-pyg`` adds PyG's ``RGCNConv`` / ``HGTConv``.

Two units: ``--unit step`` times one training step (the batch's full-graph propagation, forward
and backward, loss and optimiser step) on a fixed batch; ``--unit epoch`` times whole training
epochs as the trainer runs them (every batch, plus the epoch hooks: KGAT's TransR pass and
attention update), without validation. The models run in turn, A B C D E, A B C D E, ...
(interleaved, so load drifts on a shared machine hit them alike) and the medians are reported
with ratios against KGAT and old/new, the thread count and the load average.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/relational_speed.py [--unit step|epoch]
        [--reps 5] [--dataset ml-100k] [--threads 1] [--with-pyg] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from kgrec.models.config import TrainConfig
from kgrec.models.spec import build_model
from kgrec.models.training.pairwise import BPRTask
from kgrec.models.training.trainer import hook_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import protocol_data, protocol_snapshot  # noqa: E402

#: label -> (model name, params overrides)
VARIANTS = {
    "kgat": ("kgat", {}),
    "rgcn old (FastRGCNConv)": ("rgcn", {"conv_impl": "fast"}),
    "rgcn new (grouped)": ("rgcn", {"conv_impl": "grouped"}),
    "hgt old (einsum)": ("hgt", {"conv_impl": "einsum"}),
    "hgt new (grouped)": ("hgt", {"conv_impl": "grouped"}),
}
PYG_VARIANTS = {
    "rgcn pyg (RGCNConv)": ("rgcn", {"conv_impl": "standard"}),
    "hgt pyg (HGTConv)": ("hgt", {"conv_impl": "standard"}),
}


class Runner:
    """One model with its optimisers and task, timed by :meth:`step` or :meth:`epoch`."""

    def __init__(self, name: str, params: dict, data) -> None:
        config = TrainConfig.for_model(name, params=params) if params else TrainConfig.for_model(name)
        self.config = config.for_data(int(data.train.nnz))
        torch.manual_seed(self.config.seed)
        self.model = build_model(config, data)
        self.task = BPRTask(
            data, self.config.batch_size, self.config.selection_metric, self.config.ks,
            self.config.eval_batch_size,
        )
        self.task.prepare(self.model)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.config.learning_rate)
        self.hooks = list(self.model.epoch_hooks())
        self.hook_optimizers = [hook_optimizer(h) for h in self.hooks]
        self.generator = torch.Generator().manual_seed(self.config.seed)
        g = torch.Generator().manual_seed(0)
        size = self.config.batch_size
        self.batch = (
            torch.randint(0, data.num_users, (size,), generator=g),
            torch.randint(0, data.num_items, (size,), generator=g),
            torch.randint(0, data.num_items, (size,), generator=g),
        )

    def step(self) -> float:
        self.model.train()
        started = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.loss(*self.batch).backward()
        self.optimizer.step()
        return time.perf_counter() - started

    def epoch(self) -> float:
        self.model.train()
        started = time.perf_counter()
        self.task.train_epoch(self.model, self.optimizer, self.generator, torch.device("cpu"))
        for hook, optimizer in zip(self.hooks, self.hook_optimizers):
            hook.run(optimizer)
        return time.perf_counter() - started


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--unit", choices=["step", "epoch"], default="step")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per model")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--with-pyg", action="store_true", help="also PyG's RGCNConv / HGTConv")
    parser.add_argument("--workdir", type=Path, help="snapshot directory (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        data = protocol_data(protocol_snapshot(args.dataset, args.workdir or Path(tmp)))
    variants = VARIANTS | (PYG_VARIANTS if args.with_pyg else {})
    runners = {label: Runner(name, params, data) for label, (name, params) in variants.items()}
    print(
        f"{args.dataset}: {data.num_users} users, {data.num_items} items, {int(data.train.nnz)} train "
        f"pairs; unit={args.unit}, reps={args.reps}; torch threads={torch.get_num_threads()}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, cores={os.cpu_count()}; "
        f"load avg before: {load()}",
        flush=True,
    )
    for label, runner in runners.items():
        c = runner.config
        print(f"  {label:<24} batch {c.batch_size}, layers {c.num_layers}, dim {c.embedding_dim}", flush=True)

    times: dict[str, list[float]] = {label: [] for label in runners}
    for runner in runners.values():  # warm-up (allocator, first-call costs), not timed
        runner.step()
    for rep in range(args.reps):
        for label, runner in runners.items():
            times[label].append(runner.epoch() if args.unit == "epoch" else runner.step())
        print(f"  rep {rep + 1}: " + ", ".join(f"{k.split(' (')[0]} {v[-1]:.3f}" for k, v in times.items())
              + f"; load {load()}", flush=True)

    median = {label: statistics.median(v) for label, v in times.items()}
    unit = "s/epoch" if args.unit == "epoch" else "s/step"
    print(f"\n{'model':<24} {'median ' + unit:>14} {'min':>8} {'max':>8} {'x KGAT':>8}")
    for label, value in median.items():
        print(f"{label:<24} {value:>14.3f} {min(times[label]):>8.3f} {max(times[label]):>8.3f} "
              f"{value / median['kgat']:>8.2f}")
    print()
    for model in ("rgcn", "hgt"):
        old = next(k for k in median if k.startswith(f"{model} old"))
        new = next(k for k in median if k.startswith(f"{model} new"))
        # per-repetition ratios: each pair ran back to back, so the load is shared
        paired = statistics.median(a / b for a, b in zip(times[old], times[new]))
        print(f"{model}: old/new speed-up {median[old] / median[new]:.1f}x (median of paired ratios "
              f"{paired:.1f}x); new / KGAT {median[new] / median['kgat']:.2f} (target <= 3)")
    print(f"load avg after: {load()}")


if __name__ == "__main__":
    main()
