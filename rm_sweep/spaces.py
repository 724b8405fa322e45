"""Search-space files: YAML describing a set of models and the attack matrix over them.

    space = load_space("search_spaces/quick.yaml", data="folder:../shared/data/cifar10-jpeg")
    space.models()      # every ModelSpec to train (ensemble members included), once each
    space.ensembles()   # EnsembleSpecs
    space.cells         # MatrixCells: (protocol, source, target, attack, params, limit)

The schema is documented field by field in ``docs/search_spaces.md``. Loading validates the whole
file before anything runs and raises ``UserError`` naming the file and the field at fault, e.g.
``search_spaces/x.yaml: models[1].shallow_ratio: 1.2 is outside [0, 1)``. This module imports no
Ray: commands validate a space before starting a cluster.

Grids are expanded here, not by Ray Tune: every trial's config is then a complete ``ModelSpec``,
and models the store already holds are known (by ``model_id``) before any trial starts.
"""
from __future__ import annotations

import difflib
import itertools
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TypeVar

import yaml

from rm_sweep.errors import UserError
from rm_sweep.masks import VARIANTS, MaskConfig
from rm_sweep.models import list_models
from rm_sweep.spec import EnsembleSpec, ModelSpec, canonical_json, canonical_recipe_overrides, data_identity
from rm_sweep.store import matrix_key

PROTOCOLS = ("black", "gray", "white", "noise", "shuffle")
ADVERSARIAL = ("black", "gray", "white")  # protocols that craft adversarial images with an attack
# The paper's Gaussian-noise levels (Sec. 3.1.2) and patch-shuffle grids (App. A).
PAPER_SIGMAS_255 = (1, 2, 4, 8, 12, 16, 20, 24, 28, 32)
PAPER_PATCHES = (2, 4, 8)
DEFAULT_LIMIT = 5000  # test images per cell when neither the block nor the attack setting says

TOP_FIELDS = ("name", "description", "data", "train_subset", "test_subset", "recipe", "resources", "models", "matrix")
RESOURCE_FIELDS = ("cpus_per_trial", "gpus_per_trial", "max_failures", "max_concurrent_trials")
GRID_FIELDS = ("arch", "width", "shallow_ratio", "deep_ratio", "variant", "channel_multiplier", "seed", "mask_seed")
GROUP_FIELDS = ("name", *GRID_FIELDS, "ensemble")
ENSEMBLE_FIELDS = ("size", "seeds")
ENSEMBLE_SEEDS = ("independent", "shared")
MATRIX_FIELDS = ("sources", "targets", "attacks", "protocols", "limit", "sigmas", "patches")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


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
class MatrixCell:
    """One fact of the attack matrix, keyed exactly as the store keys its ``matrix`` rows.

    Attributes:
        protocol: one of ``PROTOCOLS``.
        source_id: model the adversarial images are crafted on; None for noise and shuffle.
        target_id: model or ensemble evaluated.
        target_kind: ``model`` or ``ensemble``.
        attack: an ``rm_sweep.attacks.SETTINGS`` name, or ``noise`` / ``shuffle``.
        attack_params: canonical JSON: the setting's ``params()``; ``{"sigma_255": s}`` for
            noise (standard deviation s/255); ``{"patches": n}`` for shuffle (n x n patches).
        limit: at most this many test images are used.
    """

    protocol: str
    source_id: str | None
    target_id: str
    target_kind: str
    attack: str
    attack_params: str
    limit: int

    def key(self) -> tuple:
        """The store's ``matrix_key`` of this cell."""
        return matrix_key(asdict(self))


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
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice in one mapping",
                                                    key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def load_space(path: str | Path, *, data: str | None = None) -> SearchSpace:
    """Read, validate and expand the search space at ``path``.

    Args:
        path: a YAML file (schema: ``docs/search_spaces.md``).
        data: overrides the file's ``data`` (``--data``); model ids follow the data set used.
    Raises:
        UserError: naming the file and the field at fault.
    """
    path = Path(path)
    where = str(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise UserError(f"{where}: cannot read the search space ({exc.strerror or exc})") from None
    try:
        raw = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{where}: not valid YAML: {problem}{at}") from None
    return parse_space(raw, where=where, default_name=path.stem, data=data)


def parse_space(raw: Any, *, where: str = "<dict>", default_name: str = "space", data: str | None = None) -> SearchSpace:
    """Validate and expand a search space given as a mapping (what ``load_space`` reads)."""
    try:
        return _Parser(where).space(raw, default_name, data)
    except _FieldError as exc:
        raise UserError(f"{where}: {exc.field}: {exc.message}" if exc.field else f"{where}: {exc.message}") from None


class _FieldError(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def _fail(field: str, message: str) -> None:
    raise _FieldError(field, message)


def _user_errors(field: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn``, turning a ``UserError`` from the core (spec, mask, recipe) into one at ``field``."""
    try:
        return fn()
    except UserError as exc:
        _fail(field, str(exc))


def _check_fields(d: Any, known: tuple[str, ...], field: str) -> dict:
    if not isinstance(d, dict):
        _fail(field or "top level", f"expected a mapping of fields, got {_show(d)}")
    for key in d:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(known)})"
            _fail(_join(field, str(key)), f"unknown field{hint}")
    return d


def _join(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


def _show(value: Any) -> str:
    return "nothing" if value is None else repr(value)


def _as_list(value: Any, field: str) -> list[tuple[str, Any]]:
    """(field path, item) for a scalar or a non-empty list."""
    if isinstance(value, list):
        if not value:
            _fail(field, "empty list (give at least one value)")
        return [(f"{field}[{i}]", v) for i, v in enumerate(value)]
    return [(field, value)]


def _number(value: Any, field: str, *, integer: bool = False) -> float | int:
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            pass
        else:  # YAML 1.1 reads 5e-4 (no dot) as text
            _fail(field, f"{value!r} is text, not a number (YAML needs a dot in exponents: write e.g. 5.0e-4)")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(field, f"expected a number, got {_show(value)}")
    if integer and value != int(value):
        _fail(field, f"expected an integer, got {value!r}")
    return int(value) if integer else value


def _ratio(value: Any, field: str) -> float:
    value = _number(value, field)
    if not 0 <= value < 1:
        _fail(field, f"{value} is outside [0, 1)")
    return float(value)


def _positive(value: Any, field: str, *, integer: bool = False, minimum: float = 0, strict: bool = True) -> float | int:
    value = _number(value, field, integer=integer)
    if value < minimum or (strict and value == minimum):
        _fail(field, f"{value} must be {'>' if strict else '>='} {minimum:g}")
    return value


def _choice(value: Any, field: str, choices: tuple[str, ...] | list[str], what: str) -> str:
    if value not in choices:
        close = difflib.get_close_matches(str(value), list(choices), n=1)
        hint = f"did you mean {close[0]}?" if close else f"choose from {', '.join(choices)}"
        _fail(field, f"unknown {what} {_show(value)}; {hint}")
    return value


def _name(value: Any, field: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        _fail(field, f"{_show(value)} is not a name (letters, digits, _ . -; starting with a letter or digit)")
    return value


def _attack_settings() -> Mapping[str, Any]:
    # Imported here, not at the top: the attacks module is only needed once a file has a matrix.
    from rm_sweep.attacks import SETTINGS

    return SETTINGS


class _Parser:
    def __init__(self, where: str) -> None:
        self.where = where

    def space(self, raw: Any, default_name: str, data_override: str | None) -> SearchSpace:
        top = _check_fields(raw, TOP_FIELDS, "")
        for required in ("data", "models"):
            if required not in top:
                _fail(required, "missing (required)")
        name = _name(top.get("name", default_name), "name")
        description = top.get("description", "")
        if not isinstance(description, str):
            _fail("description", f"expected text, got {_show(description)}")
        data = data_override if data_override is not None else top["data"]
        field = "--data" if data_override is not None else "data"
        if not isinstance(data, str):
            _fail(field, f"expected a data set (cifar10, mnist, folder:PATH), got {_show(data)}")
        _user_errors(field, lambda: data_identity(data))
        subsets = {}
        for key in ("train_subset", "test_subset"):
            value = top.get(key)
            subsets[key] = None if value is None else _positive(value, key, integer=True)
        recipe, overrides = self.recipe(top.get("recipe", "paper"))
        base = {"data": data, **subsets, "recipe": recipe, "recipe_overrides": overrides}
        groups = self.groups(top["models"], base)
        cells = self.matrix(top.get("matrix", []), groups)
        return SearchSpace(name=name, path=self.where, data=data, resources=self.resources(top.get("resources", {})),
                           groups=groups, cells=cells, description=description)

    def recipe(self, raw: Any) -> tuple[str, tuple]:
        if isinstance(raw, str):
            raw = {"name": raw}
        if not isinstance(raw, dict):
            _fail("recipe", f"expected a recipe name or a mapping with name and overrides, got {_show(raw)}")
        if "name" not in raw:
            _fail("recipe.name", "missing (required)")
        name, overrides = raw["name"], {k: v for k, v in raw.items() if k != "name"}
        for key, value in overrides.items():
            if isinstance(value, str) and key != "augment":
                _number(value, f"recipe.{key}")  # explains YAML's 5e-4-is-text trap
        return name, _user_errors("recipe", lambda: canonical_recipe_overrides(name, overrides))

    def resources(self, raw: Any) -> Resources:
        d = _check_fields(raw if raw is not None else {}, RESOURCE_FIELDS, "resources")
        defaults = Resources()
        concurrent = d.get("max_concurrent_trials")
        return Resources(
            cpus_per_trial=float(_positive(d.get("cpus_per_trial", defaults.cpus_per_trial), "resources.cpus_per_trial")),
            gpus_per_trial=float(_positive(d.get("gpus_per_trial", defaults.gpus_per_trial), "resources.gpus_per_trial",
                                           strict=False)),
            max_failures=int(_positive(d.get("max_failures", defaults.max_failures), "resources.max_failures",
                                       integer=True, strict=False)),
            max_concurrent_trials=None if concurrent is None else int(
                _positive(concurrent, "resources.max_concurrent_trials", integer=True)),
        )

    def groups(self, raw: Any, base: dict[str, Any]) -> tuple[ModelGroup, ...]:
        if not isinstance(raw, list) or not raw:
            _fail("models", f"expected a non-empty list of model groups, got {_show(raw)}")
        groups: list[ModelGroup] = []
        for i, item in enumerate(raw):
            group = self.group(item, f"models[{i}]", base)
            if any(g.name == group.name for g in groups):
                _fail(f"models[{i}].name", f"group name {group.name!r} is used twice")
            groups.append(group)
        return tuple(groups)

    def group(self, raw: Any, field: str, base: dict[str, Any]) -> ModelGroup:
        d = _check_fields(raw, GROUP_FIELDS, field)
        for required in ("name", "arch"):
            if required not in d:
                _fail(_join(field, required), "missing (required)")
        name = _name(d["name"], _join(field, "name"))
        checks: dict[str, Callable[[Any, str], Any]] = {
            "arch": lambda v, f: _choice(v, f, list_models(), "architecture"),
            "width": lambda v, f: float(_positive(v, f)),
            "shallow_ratio": _ratio,
            "deep_ratio": _ratio,
            "variant": lambda v, f: _choice(v, f, VARIANTS, "mask variant"),
            "channel_multiplier": lambda v, f: float(_positive(v, f)),
            "seed": lambda v, f: int(_positive(v, f, integer=True, strict=False)),
            "mask_seed": lambda v, f: int(_positive(v, f, integer=True, strict=False)),
        }
        defaults = {"width": 1.0, "shallow_ratio": 0.0, "deep_ratio": 0.0, "variant": "random",
                    "channel_multiplier": 1.0, "seed": 0, "mask_seed": 0}
        axes = {}
        for key in GRID_FIELDS:
            value = d.get(key, defaults.get(key))
            axes[key] = [checks[key](v, f) for f, v in _as_list(value, _join(field, key))]
        ensemble = self.ensemble(d["ensemble"], _join(field, "ensemble")) if "ensemble" in d else None
        models: dict[str, ModelSpec] = {}
        ensembles: list[EnsembleSpec] = []
        for point in itertools.product(*axes.values()):
            p = dict(zip(axes, point))
            members = []
            for seed, mask_seed in ensemble.member_seeds(p["seed"], p["mask_seed"]) if ensemble else [
                    (p["seed"], p["mask_seed"])]:
                spec = _user_errors(field, lambda: ModelSpec(
                    arch=p["arch"], width=p["width"], seed=seed,
                    mask=MaskConfig(p["shallow_ratio"], p["deep_ratio"], p["variant"], p["channel_multiplier"], mask_seed),
                    **base))
                members.append(spec)
                models.setdefault(spec.model_id, spec)
            if ensemble:
                masked = (p["shallow_ratio"] > 0 or p["deep_ratio"] > 0) and p["variant"] != "channel"
                if ensemble.seeds == "shared" and not masked:
                    _fail(_join(field, "ensemble"), "members with shared training seeds differ only by mask seed, "
                                                    "so they need a mask (shallow_ratio or deep_ratio > 0, and a "
                                                    "variant other than channel, whose networks have none)")
                ensembles.append(EnsembleSpec(tuple(members)))
        return ModelGroup(name, tuple(models.values()), tuple({e.ensemble_id: e for e in ensembles}.values()))

    def ensemble(self, raw: Any, field: str) -> EnsembleSeeds:
        d = {"size": raw} if not isinstance(raw, dict) else raw
        _check_fields(d, ENSEMBLE_FIELDS, field)
        if "size" not in d:
            _fail(_join(field, "size"), "missing (required)")
        size = int(_positive(d["size"], _join(field, "size"), integer=True, minimum=2, strict=False))
        return EnsembleSeeds(size, _choice(d.get("seeds", "independent"), _join(field, "seeds"), ENSEMBLE_SEEDS,
                                           "way of choosing member seeds"))

    def matrix(self, raw: Any, groups: tuple[ModelGroup, ...]) -> tuple[MatrixCell, ...]:
        if raw is None:
            return ()
        if not isinstance(raw, list):
            _fail("matrix", f"expected a list of blocks, got {_show(raw)}")
        cells: dict[tuple, MatrixCell] = {}
        for i, block in enumerate(raw):
            for cell in self.block(block, f"matrix[{i}]", groups):
                cells.setdefault(cell.key(), cell)
        return tuple(cells.values())

    def block(self, raw: Any, field: str, groups: tuple[ModelGroup, ...]) -> list[MatrixCell]:
        d = _check_fields(raw, MATRIX_FIELDS, field)
        by_name = {g.name: g for g in groups}
        if "protocols" not in d:
            _fail(_join(field, "protocols"), f"missing (required; choose from {', '.join(PROTOCOLS)})")
        protocols = [_choice(v, f, PROTOCOLS, "protocol") for f, v in _as_list(d["protocols"], _join(field, "protocols"))]
        adversarial = [p for p in protocols if p in ADVERSARIAL]

        def pick(key: str) -> list[ModelGroup]:
            value = d.get(key)
            if value == "all":
                return list(groups)
            return [by_name[_choice(v, f, list(by_name), "model group")] for f, v in _as_list(value, _join(field, key))]

        if "targets" not in d:
            _fail(_join(field, "targets"), "missing (required: group names or all)")
        targets = pick("targets")
        needs = {"sources": ("black", "gray"), "attacks": ADVERSARIAL, "sigmas": ("noise",), "patches": ("shuffle",)}
        for key, users in needs.items():
            if key in d and not any(p in users for p in protocols):
                _fail(_join(field, key), f"only used by protocol {' or '.join(users)}, which this block does not list")
        for key in ("sources", "attacks"):
            if key not in d and any(p in needs[key] for p in protocols):
                _fail(_join(field, key), f"missing (protocol {'/'.join(p for p in protocols if p in needs[key])} needs it)")
        sources = pick("sources") if "sources" in d else []
        for j, group in enumerate(sources):
            if group.is_ensemble:
                _fail(_join(field, "sources") if d["sources"] == "all" else f"{field}.sources[{j}]",
                      f"group {group.name!r} is a group of ensembles; attacks are crafted on single models")
        settings = _attack_settings() if adversarial else {}
        attacks = [_choice(v, f, list(settings), "attack setting")
                   for f, v in _as_list(d.get("attacks"), _join(field, "attacks"))] if adversarial else []
        limit = d.get("limit")
        if limit is not None:
            limit = int(_positive(limit, _join(field, "limit"), integer=True))
        sigmas = [_positive(v, f) for f, v in _as_list(d.get("sigmas", list(PAPER_SIGMAS_255)), _join(field, "sigmas"))]
        patches = [int(_positive(v, f, integer=True, minimum=2, strict=False))
                   for f, v in _as_list(d.get("patches", list(PAPER_PATCHES)), _join(field, "patches"))]

        target_list = [(e.ensemble_id, "ensemble", e) for g in targets for e in g.ensembles]
        target_list += [(m.model_id, "model", m) for g in targets if not g.is_ensemble for m in g.models]
        source_list = [m for g in sources for m in g.models]
        cells: list[MatrixCell] = []
        for protocol in protocols:
            if protocol in ("black", "gray"):
                for source in source_list:
                    for target_id, kind, target in target_list:
                        if _contains(target, source.model_id):
                            continue  # the source itself (or an ensemble holding it) is the white-box case
                        if protocol == "gray" and _arch(target) != source.arch:
                            _fail(field, f"gray-box pairs need one architecture: source {source.arch} "
                                         f"({source.model_id}) and target {_arch(target)} ({target_id}); "
                                         "use a black block for cross-architecture pairs")
                        if protocol == "gray" and source.seed in _training_seeds(target):
                            _fail(field, f"gray-box target {target_id} shares training seed {source.seed} with its "
                                         f"source {source.model_id}; the paper's gray-box targets are trained "
                                         "separately (another initialisation, or another mask and initialisation): "
                                         "give the target group another seed")
                        for attack in attacks:
                            cells.append(_attack_cell(protocol, source.model_id, target_id, kind, settings[attack], limit))
            elif protocol == "white":
                for target_id, kind, target in target_list:
                    if kind == "ensemble":
                        _fail(_join(field, "targets"), "white-box targets must be single models (attacks are crafted on one model)")
                    for attack in attacks:
                        cells.append(_attack_cell("white", target_id, target_id, kind, settings[attack], limit))
            else:
                values = [("sigma_255", s) for s in sigmas] if protocol == "noise" else [("patches", n) for n in patches]
                for target_id, kind, _ in target_list:
                    for param, value in values:
                        cells.append(MatrixCell(protocol, None, target_id, kind, protocol,
                                                canonical_json({param: value}), limit or DEFAULT_LIMIT))
        if not cells:
            _fail(field, "gives no matrix cell (every source equals its target?)")
        return cells


def _contains(target: ModelSpec | EnsembleSpec, model_id: str) -> bool:
    if isinstance(target, EnsembleSpec):
        return model_id in target.member_ids
    return target.model_id == model_id


def _training_seeds(target: ModelSpec | EnsembleSpec) -> set[int]:
    return {m.seed for m in target.members} if isinstance(target, EnsembleSpec) else {target.seed}


def _arch(target: ModelSpec | EnsembleSpec) -> str:
    return target.members[0].arch if isinstance(target, EnsembleSpec) else target.arch


def _attack_cell(protocol: str, source_id: str, target_id: str, kind: str, setting: Any, limit: int | None) -> MatrixCell:
    return MatrixCell(protocol, source_id, target_id, kind, setting.name, canonical_json(setting.params()),
                      limit or setting.limit)


__all__ = ["DEFAULT_LIMIT", "EnsembleSeeds", "MatrixCell", "ModelGroup", "PAPER_PATCHES", "PAPER_SIGMAS_255", "PROTOCOLS", "Resources",
           "SearchSpace", "load_space", "parse_space"]
