"""Does relabelling the graph's nodes make LightGCN's propagation cheaper per edge?

The epoch cost of the graph models grows faster than the data (issue 16: exponent 1.2-1.4) because
one sparse-dense product (``torch.sparse.mm``: CSR adjacency × 64-wide rows) costs more per edge as
the gathered rows outgrow the caches. This builds the normalised LightGCN adjacency of the
power-law data of ``benchmarks/scale.py`` at ``--scale``, relabels the nodes four ways (as
generated, by degree descending, reverse Cuthill-McKee, random) and times the product of each,
interleaved (``--repeats`` rounds, the first dropped), printing ms and ns per edge.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/node_order.py [--scale 1.0] [--threads 1] [--repeats 7]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import scipy.sparse as sp
import torch
from kgrec.features.dataset import InteractionData
from kgrec.features.split import random_split
from kgrec.features.synthetic import PowerLawConfig, powerlaw_snapshot
from kgrec.models.retrievers.lightgcn import normalized_adjacency
from scipy.sparse.csgraph import reverse_cuthill_mckee


def to_torch(matrix: sp.csr_matrix) -> torch.Tensor:
    matrix = matrix.tocsr()
    matrix.sort_indices()
    return torch.sparse_csr_tensor(
        torch.from_numpy(matrix.indptr.astype(np.int64)), torch.from_numpy(matrix.indices.astype(np.int64)),
        torch.from_numpy(matrix.data), size=matrix.shape,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = PowerLawConfig()
    config = replace(base, **{k: int(getattr(base, k) * args.scale) for k in (
        "num_users", "num_items", "num_interactions", "num_entities", "num_triples")})
    snapshot = powerlaw_snapshot(config)
    data = InteractionData.from_snapshot(snapshot, random_split(snapshot.interactions, seed=2020))
    adj = normalized_adjacency(data.train, data.num_users, data.num_items)
    n = adj.shape[0]
    matrix = sp.csr_matrix((adj.values().numpy(), adj.col_indices().numpy(), adj.crow_indices().numpy()), shape=(n, n))
    orders = {
        "as generated": np.arange(n),
        "degree descending": np.argsort(-np.diff(matrix.indptr), kind="stable"),
        "reverse Cuthill-McKee": reverse_cuthill_mckee(matrix.astype(bool).tocsr(), symmetric_mode=True),
        "random": np.random.default_rng(0).permutation(n),
    }
    products = {name: to_torch(matrix[order][:, order]) for name, order in orders.items()}
    x = torch.randn(n, 64)
    seconds: dict[str, list[float]] = {name: [] for name in products}
    for _ in range(args.repeats):
        for name, product in products.items():
            started = time.perf_counter()
            torch.sparse.mm(product, x)
            seconds[name].append(time.perf_counter() - started)
    print(f"scale {args.scale}: {n:,} nodes, {matrix.nnz:,} edges, {torch.get_num_threads()} thread(s)")
    for name, values in seconds.items():
        median = float(np.median(values[1:]))
        print(f"  {name:<22} {1e3 * median:8.1f} ms  {1e9 * median / matrix.nnz:6.1f} ns/edge")


if __name__ == "__main__":
    main()
