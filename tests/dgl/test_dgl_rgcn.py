"""The DGL R-GCN (``rgcn_dgl``): same function as the PyG R-GCN, registry, trainer and bundle."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

try:
    import dgl

    # Without a dgl distribution, pytest's rootdir on sys.path makes tests/dgl `dgl` (a namespace
    # package).
    if getattr(dgl, "__file__", None) is None:
        raise ModuleNotFoundError("no dgl distribution installed")
except Exception as exc:  # not installed (the core .venv), or built for another torch
    pytest.skip(
        f"dgl is not importable here ({type(exc).__name__}: {exc}); create .venv-dgl with "
        "`make dgl-env`, then run `make test-dgl`",
        allow_module_level=True,
    )

import numpy as np
import torch
from kgrec.features.dataset import InteractionData
from kgrec.models.backends.dgl.rgcn import DGLRGCN
from kgrec.models.config import TrainConfig
from kgrec.models.evaluation import evaluate
from kgrec.models.retrievers.rgcn import RGCN
from kgrec.models.spec import build_model, get_spec, model_names
from kgrec.models.tracking.experiment import Trained
from kgrec.models.training.pairwise import fit
from kgrec.serving.bundle import RetrievalBundle, load_bundle
from kgrec.serving.candidates import CandidateService
from kgrec.serving.export import export_bundle

pytestmark = pytest.mark.dgl

ROOT = Path(__file__).resolve().parents[2]


def copy_pyg_weights(pyg: RGCN, ours: DGLRGCN) -> None:
    """PyG's R-GCN parameters into the DGL one: the layouts differ only in shape (blocks:
    ``[R, B, d/B, d/B]`` vs ``[R, B * d/B * d/B]``; bases: ``weight``/``comp`` = ``W``/``coeff``)."""
    with torch.no_grad():
        ours.node_embedding.weight.copy_(pyg.node_embedding.weight)
        for a, b in zip(pyg.convs, ours.convs, strict=True):
            if pyg.num_blocks is not None:
                b.linear_r.W.copy_(a.weight.reshape(b.linear_r.W.shape))
            else:
                b.linear_r.W.copy_(a.weight)
                b.linear_r.coeff.copy_(a.comp)
            b.loop_weight.copy_(a.root)
            b.h_bias.copy_(a.bias)


@pytest.mark.parametrize(
    "decomposition", [{"num_blocks": 4, "num_bases": None}, {"num_blocks": None, "num_bases": 3}], ids=["blocks", "bases"]
)
@pytest.mark.parametrize("combination", ["mean", "concat"])
def test_same_weights_give_the_pyg_representations(
    synthetic_data: InteractionData, decomposition: dict, combination: str
) -> None:
    torch.manual_seed(0)
    options = dict(embedding_dim=16, num_layers=2, dropout=0.0, layer_combination=combination, **decomposition)
    pyg = RGCN(synthetic_data.num_users, synthetic_data.num_items, synthetic_data.ckg, **options)
    ours = DGLRGCN(synthetic_data.num_users, synthetic_data.num_items, synthetic_data.ckg, **options)
    copy_pyg_weights(pyg, ours)
    pyg.eval(), ours.eval()
    with torch.no_grad():
        expected, got = pyg.propagate_all(), ours.propagate_all()
    assert got.shape == expected.shape == (synthetic_data.ckg.num_nodes, ours.output_dim)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_forward_backward_and_reset(synthetic_data: InteractionData) -> None:
    model = DGLRGCN(synthetic_data.num_users, synthetic_data.num_items, synthetic_data.ckg, embedding_dim=16)
    model.train()
    loss = model.loss(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5]))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())
    drawn = {n: p for n, p in model.named_parameters() if not n.endswith("h_bias")}  # biases restart at 0
    before = {n: p.detach().clone() for n, p in drawn.items()}
    torch.manual_seed(1)
    model.reset_parameters()
    assert all(not torch.equal(before[n], p) for n, p in drawn.items())
    assert all(torch.count_nonzero(conv.h_bias) == 0 for conv in model.convs)
    users, items = model.embeddings()
    assert users.shape == (synthetic_data.num_users, 16) and items.shape == (synthetic_data.num_items, 16)


def test_registered_as_a_retriever_variant() -> None:
    assert "rgcn_dgl" in model_names("retriever")
    spec = get_spec("rgcn_dgl")
    assert spec.family == "retriever" and spec.defaults == get_spec("rgcn").defaults
    with pytest.raises(ValueError):
        TrainConfig.for_model("rgcn_dgl", params={"conv_impl": "fast"})  # a PyG-only switch


def test_trained_by_the_trainer_and_exported_as_an_embedding_bundle(
    synthetic_data: InteractionData, tmp_path: Path
) -> None:
    config = TrainConfig.for_model(
        "rgcn_dgl", embedding_dim=16, epochs=6, eval_every=2, patience=10, device="cpu", seed=3,
    )
    model = build_model(config, synthetic_data)
    assert isinstance(model, DGLRGCN)
    result = fit(model, synthetic_data, config)
    assert len(result.history) >= 1
    metrics = evaluate(model, synthetic_data.test, exclude=(synthetic_data.train, synthetic_data.valid), ks=(20,))
    assert np.isfinite(metrics["recall@20"])
    trained = Trained(run_id="run-dgl", spec=get_spec("rgcn_dgl"), config=config, model=model,
                      fit=result, inputs=synthetic_data)
    bundle_dir = export_bundle(trained, tmp_path / "bundle")
    bundle = load_bundle(bundle_dir)
    assert isinstance(bundle, RetrievalBundle) and bundle.meta["model"] == "rgcn_dgl"
    with torch.no_grad():
        users, items = model.embeddings()
    np.testing.assert_allclose(bundle.item_embeddings, items.numpy(), atol=1e-6)
    user_id = bundle.users["user_id"][0]
    top = CandidateService(bundle).for_user(str(user_id), k=5)
    assert len(top.candidates) == 5


def test_the_bundle_is_served_without_dgl(synthetic_data: InteractionData, tmp_path: Path) -> None:
    """The embedding bundle loads in a process that cannot import dgl (the service's case)."""
    config = TrainConfig.for_model("rgcn_dgl", embedding_dim=8, epochs=1, eval_every=1, device="cpu")
    model = build_model(config, synthetic_data)
    result = fit(model, synthetic_data, config)
    trained = Trained(run_id="run-dgl-1", spec=get_spec("rgcn_dgl"), config=config, model=model,
                      fit=result, inputs=synthetic_data)
    bundle_dir = export_bundle(trained, tmp_path / "bundle")
    probe = (
        "import sys; sys.modules['dgl'] = None\n"  # any `import dgl` now raises ImportError
        "from kgrec.serving.bundle import load_bundle\n"
        "from kgrec.serving.candidates import CandidateService\n"
        f"b = load_bundle({str(bundle_dir)!r})\n"
        "r = CandidateService(b).for_user(str(b.users['user_id'][0]), k=3)\n"
        "print(len(r.candidates))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "3"
