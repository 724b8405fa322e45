"""Search-space files: YAML describing a set of models and the attack matrix over them.

    space = load_space("quick", data="folder:../shared/data/cifar10-jpeg")   # or a path to a YAML file
    space.models()      # every ModelSpec to train (ensemble members included), once each
    space.ensembles()   # EnsembleSpecs
    space.cells         # MatrixCells: (protocol, source, target, attack, params, limit)

The spaces of the paper's experiments ship with the package (``rm_sweep/search_spaces/*.yaml``,
also ``search_spaces/`` in a checkout) and load by bare name: ``quick``, ``fig14``, ``table2``, ...
The schema is documented field by field in ``docs/search_spaces.md``. Loading validates the whole
file before anything runs (``rm_sweep.space_parser`` holds the grammar) and raises ``UserError``
naming the file and the field at fault, e.g. ``search_spaces/x.yaml: models[1].shallow_ratio: 1.2
is outside [0, 1)``. Specs, recipes and spaces import no Ray, no training loop and no pyarrow:
commands validate a space before starting anything.

Grids are expanded here, not by Ray Tune: every trial's config is then a complete ``ModelSpec``,
and models the store already holds are known (by ``model_id``) before any trial starts.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from rm_sweep.errors import UserError
from rm_sweep.spec import EnsembleSpec, MatrixCell, ModelSpec

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable


@dataclass(frozen=True)
class Resources:
    """What one trial asks of the cluster, and how often a failed trial is retried.

    ``max_concurrent_trials`` None means: as many as the cluster's resources hold.
    """

    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_failures: int = 2
    max_concurrent_trials: int | None = None


@dataclass(frozen=True)
class EnsembleSeeds:
    """How a group's grid point becomes an ensemble of ``size`` models.

    ``independent`` (the paper's "EN": five separately trained networks): member i has training
    seed ``seed + i`` and mask seed ``mask_seed + i``, so members differ in initial weights,
    data order, augmentation and mask. ``shared``: every member has the point's training seed
    and member i mask seed ``mask_seed + i`` (members differ in their masks only; an ablation).
    Either way member 0 is the grid point's own model, trained once.
    """

    size: int
    seeds: str = "independent"

    def member_seeds(self, seed: int, mask_seed: int) -> list[tuple[int, int]]:
        """(training seed, mask seed) of each member."""
        step = 1 if self.seeds == "independent" else 0
        return [(seed + step * i, mask_seed + i) for i in range(self.size)]


@dataclass(frozen=True)
class ModelGroup:
    """A named grid of models. With ``ensemble`` each grid point is an ensemble
    (``EnsembleSeeds``) and the group's matrix targets are those ensembles."""

    name: str
    models: tuple[ModelSpec, ...]
    ensembles: tuple[EnsembleSpec, ...] = ()

    @property
    def is_ensemble(self) -> bool:
        return bool(self.ensembles)


@dataclass(frozen=True)
class SearchSpace:
    """A validated, expanded search space.

    Attributes:
        name: the space's name (Ray runs are named after it).
        path: the file it came from ("<dict>" when built from a mapping).
        data: where the data is loaded from (``cifar10``, ``mnist``, ``folder:PATH``), after any
            ``--data`` override; the models carry its identity (``ModelSpec.data``).
        resources: per-trial resources.
        groups: the model groups, in file order.
        cells: the attack matrix, one cell per fact, in file order.
    """

    name: str
    path: str
    data: str
    resources: Resources
    groups: tuple[ModelGroup, ...]
    cells: tuple[MatrixCell, ...]
    description: str = ""

    def models(self) -> list[ModelSpec]:
        """Every model to train (ensemble members included), each once, in file order."""
        return _first_of_each((s for g in self.groups for s in g.models), lambda s: s.model_id)

    def ensembles(self) -> list[EnsembleSpec]:
        """Every ensemble, each once, in file order."""
        return _first_of_each((e for g in self.groups for e in g.ensembles), lambda e: e.ensemble_id)

    def group(self, name: str) -> ModelGroup:
        for group in self.groups:
            if group.name == name:
                return group
        raise UserError(f"search space {self.name} has no model group {name!r}")


_Item = TypeVar("_Item")


def _first_of_each(items: Iterable[_Item], key: Callable[[_Item], str]) -> list[_Item]:
    """``items`` in order, keeping the first of each ``key``."""
    seen: dict[str, _Item] = {}
    for item in items:
        seen.setdefault(key(item), item)
    return list(seen.values())


# -- loading ---------------------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping (PyYAML keeps the last silently)."""


def _mapping_without_duplicates(loader: _Loader, node: yaml.MappingNode) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, Hashable):
            raise yaml.constructor.ConstructorError(None, None, "a list or a mapping cannot be a key",
                                                    key_node.start_mark)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice in one mapping",
                                                    key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


# Where the packaged spaces live, inside the installed package (a checkout links search_spaces/ here).
_PACKAGED: Traversable = resources.files("rm_sweep") / "search_spaces"


def packaged_spaces() -> list[str]:
    """Names of the search spaces shipped with the package (``fig14``, ``quick``, ...), sorted."""
    return sorted(f.name.removesuffix(".yaml") for f in _PACKAGED.iterdir() if f.name.endswith(".yaml"))


def _source(path: str | Path) -> Path | Traversable:
    """The file ``path`` names: itself if it exists or looks like a path (a directory part or a
    suffix), else the packaged space of that name when there is one."""
    path = Path(path)
    if path.exists() or len(path.parts) != 1 or path.suffix:
        return path
    packaged = _PACKAGED / f"{path.name}.yaml"
    return packaged if packaged.is_file() else path


def load_space(path: str | Path, *, data: str | None = None) -> SearchSpace:
    """Read, validate and expand a search space.

    Args:
        path: a YAML file (schema: ``docs/search_spaces.md``), or the bare name of a packaged
            space (``quick``, ``fig14``; ``packaged_spaces()``) when no such file exists.
        data: overrides the file's ``data`` (``--data``); model ids follow the data set used.
    Raises:
        UserError: naming the file and the field at fault; for a file that cannot be read, also
            the packaged spaces.
    """
    source = _source(path)
    where = str(source)
    try:
        text = source.read_text(encoding="utf-8")  # YAML's encoding, whatever the locale
    except OSError as exc:
        raise UserError(f"{where}: cannot read the search space ({exc.strerror or exc}); packaged spaces: "
                        f"{', '.join(packaged_spaces())}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{where}: not a YAML text file: byte {exc.object[exc.start]:#04x} at offset {exc.start} "
                        "is not UTF-8") from None
    try:
        raw = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{where}: not valid YAML: {problem}{at}") from None
    return parse_space(raw, where=where, default_name=Path(source.name).stem, data=data)


def parse_space(raw: Any, *, where: str = "<dict>", default_name: str = "space", data: str | None = None) -> SearchSpace:
    """Validate and expand a search space given as a mapping (what ``load_space`` reads)."""
    from rm_sweep.space_parser import parse

    try:
        return dataclasses.replace(parse(raw, default_name, data), path=where)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None


__all__ = ["EnsembleSeeds", "ModelGroup", "Resources", "SearchSpace", "load_space", "packaged_spaces", "parse_space"]
