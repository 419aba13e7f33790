"""The model registry: every model is declared once, as a :class:`ModelSpec` in its own file.

A model file under ``models/retrievers/``, ``models/sequential/`` or ``models/rankers/`` ends with
``register(ModelSpec(...))``; the registry imports those packages on first use, so adding a model
is adding one file. Everything else derives from the registry: the CLI ``--models`` choices and
help, the pipeline's validation, the config classes' ``model`` check and recommended defaults, the
MLflow params (``model``, ``family``) and the model table of the README (:func:`markdown_table`).

The *family* of a spec names the training task, configuration class, evaluation protocol and
artefact kind it shares with its siblings (:mod:`kgrec.models.families`):

============  ===========================================  ====================  ===============
family        trained by                                    configuration         artefact
============  ===========================================  ====================  ===============
retriever     BPR on (user, positive, negative) triples    ``TrainConfig``       ``embedding``
sequential    next-item softmax over time-ordered histories ``SequentialModelConfig`` ``multi_interest``
ranker        BPR with the retriever's hard negatives,      ``KCANConfig``        ``ranker``
              selected on the re-ranked list
============  ===========================================  ====================  ===============
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from pydantic import BaseModel

Family = Literal["retriever", "sequential", "ranker"]
FAMILIES: tuple[Family, ...] = ("retriever", "sequential", "ranker")

#: Packages whose modules declare models; imported once, on the registry's first use.
MODEL_PACKAGES: tuple[str, ...] = (
    "kgrec.models.retrievers",
    "kgrec.models.sequential",
    "kgrec.models.rankers",
    # Optional backends: their spec modules import no backend library and register a variant only
    # where that library is installed (models/backends/dgl/spec.py).
    "kgrec.models.backends",
)


@dataclass(frozen=True)
class ModelSpec:
    """One model, declared once.

    Args:
        name: the name users type (``--models kgat``), unique across families.
        family: ``"retriever"``, ``"sequential"`` or ``"ranker"`` (module docstring).
        build: ``(config, inputs) -> torch.nn.Module``: an untrained model for the family's config
            and training inputs (``InteractionData`` for retrievers and rankers, the sequence split
            for sequential models).
        summary: one line for ``--help`` and the docs (model, paper, year).
        params: the pydantic class of the model's own hyper-parameters (``TrainConfig.params``;
            retrievers only), ``None`` when it takes none.
        defaults: recommended configuration overrides (tuned on validation; the comment beside
            the spec says on what), applied by the family config's ``for_model``.
        check: optional ``(config) -> None`` raising ``ValueError`` for settings the model does not
            support (called when the family config is validated, so a bad combination fails at the
            edge, not after the data is loaded).
        fit: optional replacement of the family's training step, for a model not trained by
            gradient descent (the interest mixture: a YouTube-DNN first, then k-means), with the
            family step's signature.
        search_space: what ``kgrec tune`` searches (:mod:`kgrec.models.tracking.tuning`): config
            field names (``"learning_rate"``, or ``"params.<name>"`` for a model parameter) to
            Optuna distributions; the fields left out keep ``defaults``. Empty: not tunable.
        needs_kg: the model reads the knowledge graph, so it refuses a dataset without one
            (:func:`require_kg`).
    """

    name: str
    family: Family
    build: Callable[..., Any]
    summary: str
    params: type[BaseModel] | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)
    check: Callable[[Any], None] | None = None
    fit: Callable[..., Any] | None = None
    search_space: Mapping[str, Any] = field(default_factory=dict)
    needs_kg: bool = False

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"{self.name}: family must be one of {FAMILIES}, got {self.family!r}")
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))
        object.__setattr__(self, "search_space", MappingProxyType(dict(self.search_space)))


_REGISTRY: dict[str, ModelSpec] = {}
_discovered = False


def register(spec: ModelSpec) -> ModelSpec:
    """Add ``spec`` to the registry (at import of its model file); names are unique."""
    known = _REGISTRY.get(spec.name)
    if known is not None and known is not spec:
        raise ValueError(f"model {spec.name!r} is declared twice ({known.build} and {spec.build})")
    _REGISTRY[spec.name] = spec
    return spec


def _discover() -> None:
    # A plugin scan, not an import cycle: model files import this module, never the reverse.
    global _discovered
    if _discovered:
        return
    for package_name in MODEL_PACKAGES:
        package = importlib.import_module(package_name)
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package_name}.{module.name}")
    _discovered = True


def model_specs(family: Family | None = None) -> tuple[ModelSpec, ...]:
    """Every registered spec (of ``family``), in declaration order."""
    _discover()
    return tuple(s for s in _REGISTRY.values() if family is None or s.family == family)


def model_names(family: Family | None = None) -> tuple[str, ...]:
    return tuple(s.name for s in model_specs(family))


def get_spec(name: str, family: Family | None = None) -> ModelSpec:
    """The spec of ``name``; a ``ValueError`` lists the known names (of ``family``)."""
    _discover()
    spec = _REGISTRY.get(name)
    if spec is None or (family is not None and spec.family != family):
        raise ValueError(f"unknown {family or ''} model {name!r}; known: {list(model_names(family))}".replace("  ", " "))
    return spec


def markdown_table() -> str:
    """The model table of the README: name, family, what it is."""
    rows = ["| model | family | what it is |", "| --- | --- | --- |"]
    rows += [f"| `{s.name}` | {s.family} | {s.summary} |" for s in model_specs()]
    return "\n".join(rows)


def require_kg(model: str, snapshot: Any) -> None:
    """Raise ``ValueError`` if ``model`` needs a knowledge graph and ``snapshot`` has none."""
    if snapshot is None or snapshot.has_kg or not get_spec(model).needs_kg:
        return
    spec = snapshot.manifest.get("spec") or {}
    missing = [key for key in ("item_links", "kg") if not spec.get(key)]
    why = (
        f"its spec declares no {' and no '.join(repr(k) for k in missing)}"
        if missing
        else "its KG file has no accepted triple"
    )
    raise ValueError(
        f"model {model!r} needs a knowledge graph, but dataset {snapshot.name!r} has none "
        f"({why}); add 'item_links' and 'kg' to the spec, or choose a model without a KG "
        f"({', '.join(s.name for s in model_specs(get_spec(model).family) if not s.needs_kg)})"
    )


def build_model(config: Any, inputs: Any) -> Any:
    """An untrained ``config.model`` for ``inputs`` (the spec's ``build``); a model that needs a
    KG refuses inputs whose snapshot has none."""
    require_kg(config.model, getattr(inputs, "snapshot", None))
    return get_spec(config.model).build(config, inputs)
