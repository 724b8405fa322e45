"""The search-space grammar: every field checked and named, grids expanded, matrix blocks made into cells.

``rm_sweep.spaces.parse_space`` is the entry point; errors raised here name the field at fault
(``models[1].shallow_ratio: 1.2 is outside [0, 1)``) and ``parse_space`` adds the file.
"""
from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable
from typing import Any

from rm_sweep import checks
from rm_sweep.errors import UserError
from rm_sweep.masks import VARIANTS, MaskConfig
from rm_sweep.models import list_models
from rm_sweep.protocols import PROTOCOLS, Protocol
from rm_sweep.recipes import canonical_overrides
from rm_sweep.spaces import EnsembleSeeds, ModelGroup, Resources, SearchSpace
from rm_sweep.spec import EnsembleSpec, MatrixCell, ModelSpec, canonical_json, data_identity

TOP_FIELDS = ("name", "description", "data", "train_subset", "test_subset", "recipe", "resources", "models", "matrix")
RESOURCE_FIELDS = ("cpus_per_trial", "gpus_per_trial", "max_failures", "max_concurrent_trials")
GROUP_FIELDS = ("name", "arch", "width", "shallow_ratio", "deep_ratio", "variant", "channel_multiplier", "seed",
                "mask_seed", "ensemble")
ENSEMBLE_FIELDS = ("size", "seeds")
MAX_ENSEMBLE = 1000  # far above the paper's 5; a typo of millions would build millions of specs first
ENSEMBLE_SEEDS = ("independent", "shared")
# A block lists protocols, sources and targets, a limit, and each protocol's values (attacks, sigmas, ...).
VALUE_FIELDS = tuple(dict.fromkeys(p.values for p in PROTOCOLS.values()))
MATRIX_FIELDS = ("sources", "targets", "protocols", "limit", *VALUE_FIELDS)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def parse(raw: Any, default_name: str, data_override: str | None) -> SearchSpace:
    """The ``SearchSpace`` of a mapping read from a file (``path`` left to the caller)."""
    return _Parser().space(raw, default_name, data_override)


class _Located(UserError):
    """A search-space error whose message already names its field."""


def _fail(field: str, message: str) -> None:
    raise _Located(f"{field}: {message}" if field else message)


def _at(field: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn``; a ``UserError`` from the core (a check, a spec, a recipe) is reported at ``field``."""
    try:
        return fn()
    except _Located:
        raise
    except UserError as exc:
        _fail(field, str(exc))


def _check(check: Callable[..., Any], value: Any, field: str, **kwargs: Any) -> Any:
    """``check(value, field, **kwargs)``, one of ``rm_sweep.checks``: its message names ``field``."""
    try:
        return check(value, field, **kwargs)
    except UserError as exc:
        raise _Located(str(exc)) from None


def _fields(d: Any, known: Iterable[str], field: str) -> dict:
    """``d`` if it is a mapping of known fields."""
    if not isinstance(d, dict):
        _fail(field or "top level", f"expected a mapping of fields, got {_show(d)}")
    try:
        return dict(checks.known_fields(d, known, field))
    except UserError as exc:
        raise _Located(str(exc)) from None


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


def _choice(value: Any, field: str, choices: Iterable[str], what: str) -> str:
    return _at(field, lambda: checks.choice(value, list(choices), what))


def _name(value: Any, field: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        _fail(field, f"{_show(value)} is not a name (letters, digits, _ . -; starting with a letter or digit)")
    return value


# The grid fields of a model group: how each value is checked, and its default.
_GRID: dict[str, tuple[Callable[[Any, str], Any], Any]] = {
    "arch": (lambda v, f: _choice(v, f, list_models(), "architecture"), None),
    "width": (lambda v, f: float(_check(checks.positive, v, f)), 1.0),
    "shallow_ratio": (lambda v, f: _check(checks.ratio, v, f), 0.0),
    "deep_ratio": (lambda v, f: _check(checks.ratio, v, f), 0.0),
    "variant": (lambda v, f: _choice(v, f, VARIANTS, "mask variant"), "random"),
    "channel_multiplier": (lambda v, f: float(_check(checks.positive, v, f)), 1.0),
    "seed": (lambda v, f: _check(checks.seed, v, f), 0),
    "mask_seed": (lambda v, f: _check(checks.seed, v, f), 0),
}


class _Parser:
    def space(self, raw: Any, default_name: str, data_override: str | None) -> SearchSpace:
        top = _fields(raw, TOP_FIELDS, "")
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
        _at(field, lambda: data_identity(data))
        subsets = {key: None if top.get(key) is None else _check(checks.positive_int, top[key], key)
                   for key in ("train_subset", "test_subset")}
        recipe, overrides = self.recipe(top.get("recipe", "paper"))
        base = {"data": data, **subsets, "recipe": recipe, "recipe_overrides": overrides}
        groups = self.groups(top["models"], base)
        cells = self.matrix(top.get("matrix", []), groups)
        return SearchSpace(name=name, path="", data=data, resources=self.resources(top.get("resources", {})),
                           groups=groups, cells=cells, description=description)

    def recipe(self, raw: Any) -> tuple[str, tuple]:
        if isinstance(raw, str):
            raw = {"name": raw}
        if not isinstance(raw, dict):
            _fail("recipe", f"expected a recipe name or a mapping with name and overrides, got {_show(raw)}")
        if "name" not in raw:
            _fail("recipe.name", "missing (required)")
        name, overrides = raw["name"], {k: v for k, v in raw.items() if k != "name"}
        return name, _at("recipe", lambda: canonical_overrides(name, overrides))

    def resources(self, raw: Any) -> Resources:
        d = _fields(raw if raw is not None else {}, RESOURCE_FIELDS, "resources")
        defaults = Resources()
        concurrent = d.get("max_concurrent_trials")
        return Resources(
            cpus_per_trial=float(_check(checks.positive, d.get("cpus_per_trial", defaults.cpus_per_trial),
                                        "resources.cpus_per_trial")),
            gpus_per_trial=float(_check(checks.positive, d.get("gpus_per_trial", defaults.gpus_per_trial),
                                        "resources.gpus_per_trial", strict=False)),
            max_failures=int(_check(checks.positive, d.get("max_failures", defaults.max_failures),
                                    "resources.max_failures", integer=True, strict=False)),
            max_concurrent_trials=None if concurrent is None else _check(
                checks.positive_int, concurrent, "resources.max_concurrent_trials"),
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
        d = _fields(raw, GROUP_FIELDS, field)
        for required in ("name", "arch"):
            if required not in d:
                _fail(_join(field, required), "missing (required)")
        name = _name(d["name"], _join(field, "name"))
        axes = {key: [check(v, f) for f, v in _as_list(d.get(key, default), _join(field, key))]
                for key, (check, default) in _GRID.items()}
        ensemble = self.ensemble(d["ensemble"], _join(field, "ensemble")) if "ensemble" in d else None
        models: dict[str, ModelSpec] = {}
        ensembles: list[EnsembleSpec] = []
        for point in itertools.product(*axes.values()):
            p = dict(zip(axes, point))
            members = []
            for seed, mask_seed in ensemble.member_seeds(p["seed"], p["mask_seed"]) if ensemble else [
                    (p["seed"], p["mask_seed"])]:
                spec = _at(field, lambda p=p, seed=seed, mask_seed=mask_seed: ModelSpec(
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
        d = _fields({"size": raw} if not isinstance(raw, dict) else raw, ENSEMBLE_FIELDS, field)
        if "size" not in d:
            _fail(_join(field, "size"), "missing (required)")
        size = int(_check(checks.positive, d["size"], _join(field, "size"), integer=True, minimum=2, strict=False,
                          maximum=MAX_ENSEMBLE))
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
        d = _fields(raw, MATRIX_FIELDS, field)
        if "protocols" not in d:
            _fail(_join(field, "protocols"), f"missing (required; choose from {', '.join(PROTOCOLS)})")
        protocols = [PROTOCOLS[_choice(v, f, PROTOCOLS, "protocol")]
                     for f, v in _as_list(d["protocols"], _join(field, "protocols"))]
        users = {key: [p.name for p in PROTOCOLS.values() if key == "sources" and p.source == "other"
                       or p.values == key] for key in ("sources", *VALUE_FIELDS)}
        for key, names in users.items():
            if key in d and not any(p.name in names for p in protocols):
                _fail(_join(field, key), f"only used by protocol {' or '.join(names)}, which this block does not list")
            needed = [p.name for p in protocols if p.name in names and not (key == p.values and p.defaults)]
            if key not in d and needed:
                _fail(_join(field, key), f"missing (protocol {'/'.join(needed)} needs it)")
        if "targets" not in d:
            _fail(_join(field, "targets"), "missing (required: group names or all)")
        targets = _members(d, "targets", field, groups)
        sources = _members(d, "sources", field, groups) if "sources" in d else []
        limit = None if d.get("limit") is None else _check(checks.positive_int, d["limit"], _join(field, "limit"))
        cells: list[MatrixCell] = []
        for protocol in protocols:
            values = [(f, _at(f, lambda v=v, protocol=protocol: protocol.cell(v, limit)))
                      for f, v in _as_list(d.get(protocol.values, list(protocol.defaults)), _join(field, protocol.values))]
            for source_id, target_id, kind in _pairs(protocol, sources, targets, field):
                cells += [MatrixCell(protocol.name, source_id, target_id, kind, attack, canonical_json(params), n)
                          for _, (attack, params, n) in values]
        if not cells:
            _fail(field, "gives no matrix cell (every source equals its target?)")
        return cells


_Unit = tuple[str, str, "ModelSpec | EnsembleSpec"]  # (id, "model" or "ensemble", spec)


def _members(d: dict, key: str, field: str, groups: tuple[ModelGroup, ...]) -> list[_Unit]:
    """The models and ensembles of the groups ``d[key]`` names (``all``: every group): an
    ensemble group stands for its ensembles, not its members."""
    by_name = {g.name: g for g in groups}
    value = d[key]
    picked = list(groups) if value == "all" else [
        by_name[_choice(v, f, by_name, "model group")] for f, v in _as_list(value, _join(field, key))]
    units: list[_Unit] = [(e.ensemble_id, "ensemble", e) for g in picked for e in g.ensembles]
    return units + [(m.model_id, "model", m) for g in picked if not g.is_ensemble for m in g.models]


def _pairs(protocol: Protocol, sources: list[_Unit], targets: list[_Unit],
           field: str) -> Iterable[tuple[str | None, str, str]]:
    """(source id, target id, target kind) of each cell the protocol makes from the block."""
    if protocol.source == "self":
        return [(target_id, target_id, kind) for target_id, kind, _ in targets]
    if protocol.source == "none":
        return [(None, target_id, kind) for target_id, kind, _ in targets]
    pairs = []
    for source_id, _, source in sources:
        for target_id, kind, target in targets:
            if _model_ids(source) & _model_ids(target):
                continue  # a model attacked with its own gradients (or an ensemble holding it): white-box
            reason = protocol.check_pair(source, target)
            if reason:
                _fail(field, reason)
            pairs.append((source_id, target_id, kind))
    return pairs


def _model_ids(unit: ModelSpec | EnsembleSpec) -> set[str]:
    return set(unit.member_ids) if isinstance(unit, EnsembleSpec) else {unit.model_id}


__all__ = ["MATRIX_FIELDS", "VALUE_FIELDS", "parse"]
