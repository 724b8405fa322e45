"""The attack matrix on Ray: crafting tasks, and a pool of actors that hold the targets.

Cost is what the paper's protocol needs and no more: one crafting run per (source, attack
setting, limit), and one forward pass per (adversarial set, target) plus one clean pass per
target over the test images it is asked about (clean predictions are cached in the actor:
every set is cut from the same test images, so a target's clean verdict on image i is the
same for all of them). Never one attack per cell.

    driver ──craft task (source, setting)──► AdversarialSet in the object store (uint8 when quantised)
       │                                           │ ObjectRef, never through the driver
       └── TargetShard actors (each loads its shard of targets once, ensembles included)
              evaluate(set, targets) ──► counts ──► driver ──► store.add_matrix (one file per job)

Why not ``ray.util.ActorPool``: it hands each work item to whichever actor is idle, which
assumes interchangeable actors. Here each actor holds a different shard of the targets (so
the pool's memory is one copy of every target, not one per actor), and every set must reach
every shard that holds one of its targets: work is addressed to a given actor. Fault tolerance
comes from Ray itself: a shard actor that dies is restarted (``max_restarts``; its ``__init__``
reloads its shard) and the calls in flight are retried (``max_task_retries``); crafting tasks
are retried by Ray (``max_retries``). Every call is a pure function of its inputs, so a retry
gives the same counts, and the driver keeps one result per cell.

Sets larger than the object store's memory spill to local disk (Ray's own spilling); nothing
here holds a whole set in the driver.

A test hook: if ``fault_file`` is given and exists when a shard actor receives a call, the
actor deletes the file and exits its process at once (``os._exit``), as a crashed node would.
"""
from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import ray
import torch
from torch import nn
from tqdm import tqdm

from rm_sweep.attacks import AttackSetting
from rm_sweep.ensemble import Ensemble
from rm_sweep.errors import UserError
from rm_sweep.evaluate import AdversarialSet, DefenseCounts, craft, perturbation, predict, white_box
from rm_sweep.spaces import MatrixCell
from rm_sweep.store import Store

PERTURBATION_SEED = 0  # noise and shuffle draws depend on (this seed, test-image position) only


# -- planning (pure) ---------------------------------------------------------------------------
@dataclass(frozen=True)
class CraftJob:
    """One crafting run and the cells it serves: black/gray cells (evaluated by the actors) and
    white cells (counted from the set itself)."""

    source_id: str
    setting: AttackSetting
    limit: int
    cells: tuple[MatrixCell, ...]

    @property
    def target_cells(self) -> tuple[MatrixCell, ...]:
        return tuple(c for c in self.cells if c.protocol != "white")


@dataclass(frozen=True)
class PerturbJob:
    """One noise level or patch grid, on the first ``limit`` test images, for its targets."""

    protocol: str
    value: float
    limit: int
    cells: tuple[MatrixCell, ...]

    @property
    def target_cells(self) -> tuple[MatrixCell, ...]:
        """Every cell: each names a target to perturb images for (as ``CraftJob.target_cells``)."""
        return self.cells


def cell_setting(cell: MatrixCell) -> AttackSetting:
    """The attack setting a cell names, rebuilt from its stored parameters (so a cell keeps its
    meaning even if the named setting's table changes)."""
    params = json.loads(cell.attack_params)
    try:
        return AttackSetting(name=cell.attack, **params)
    except TypeError as exc:
        raise UserError(f"matrix cell {cell.attack}: unknown attack parameters {cell.attack_params} ({exc})") from None


def plan(cells: Sequence[MatrixCell]) -> tuple[list[CraftJob], list[PerturbJob]]:
    """Group cells into crafting runs per (source, attack parameters, limit) and perturbation
    jobs per (protocol, level, limit), in first-seen order."""
    crafts: dict[tuple, list[MatrixCell]] = defaultdict(list)
    perturbs: dict[tuple, list[MatrixCell]] = defaultdict(list)
    for cell in cells:
        if cell.protocol in ("noise", "shuffle"):
            (value,) = json.loads(cell.attack_params).values()
            perturbs[(cell.protocol, value, cell.limit)].append(cell)
        else:
            crafts[(cell.source_id, cell.attack, cell.attack_params, cell.limit)].append(cell)
    craft_jobs = [CraftJob(k[0], cell_setting(v[0]), k[3], tuple(v)) for k, v in crafts.items()]
    perturb_jobs = [PerturbJob(k[0], k[1], k[2], tuple(v)) for k, v in perturbs.items()]
    return craft_jobs, perturb_jobs


def shard_targets(targets: Mapping[str, Sequence[str]], shards: int) -> list[dict[str, list[str]]]:
    """Split targets (id -> member model ids) into ``shards`` groups of similar cost (members
    to run), largest first onto the lightest shard; no group is empty."""
    shards = max(1, min(shards, len(targets)))
    groups: list[dict[str, list[str]]] = [{} for _ in range(shards)]
    load = [0] * shards
    for target_id, members in sorted(targets.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        lightest = load.index(min(load))
        groups[lightest][target_id] = list(members)
        load[lightest] += len(members)
    return groups


def cell_row(cell: MatrixCell, counts: DefenseCounts) -> dict[str, Any]:
    """The store's matrix row for a cell and its counts."""
    return {**asdict(cell), **counts.as_dict()}


# -- remote work -------------------------------------------------------------------------------
def _device() -> torch.device:
    """The GPU Ray assigned to this task or actor, else the CPU."""
    return torch.device("cuda") if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")


def _use_cpus(cpus: float) -> None:
    # Ray reserves CPUs but does not stop torch from starting a thread per core; one thread per
    # reserved CPU keeps concurrent tasks from fighting over the same cores.
    torch.set_num_threads(max(1, int(cpus)))


@ray.remote(num_returns=2)
def _craft_task(store_uri: str, source_id: str, setting: AttackSetting, limit: int, images: torch.Tensor,
                labels: torch.Tensor, batch_size: int, cpus: float) -> tuple[dict[str, Any], AdversarialSet]:
    """Craft one adversarial set on the source; returns a small summary (for the driver) and the
    set (for the actors: it stays in the object store)."""
    _use_cpus(cpus)
    start = time.perf_counter()
    source = Store(store_uri).load_model(source_id).to(_device())
    adversarial_set = craft(source, images, labels, setting, limit, source_id=source_id, batch_size=batch_size)
    summary = {"n_crafted": adversarial_set.n_crafted, "n_fooled_source": adversarial_set.n_fooled_source,
               "white": white_box(adversarial_set), "seconds": time.perf_counter() - start}
    return summary, adversarial_set


@ray.remote
class TargetShard:
    """Holds a shard of the targets (models and five-mask ensembles) and evaluates adversarial
    sets and perturbations against them, returning counts.

    The test images come with every call (from the object store: one copy per node) rather than
    with the constructor, so a restarted actor needs nothing but the store to rebuild itself.

    Args:
        store_uri: where the models' checkpoints are.
        targets: target id -> member model ids (one for a model, N for an ensemble).
        cpus: CPUs reserved for this actor (torch threads). batch_size: images per forward pass.
        fault_file: test hook (module docstring).
    """

    def __init__(self, store_uri: str, targets: Mapping[str, Sequence[str]], cpus: float, batch_size: int,
                 fault_file: str | None = None) -> None:
        _use_cpus(cpus)
        self.device = _device()
        store = Store(store_uri)
        models: dict[str, nn.Module] = {}
        self.targets: dict[str, nn.Module] = {}
        for target_id, members in targets.items():
            loaded = [models.setdefault(m, store.load_model(m).to(self.device)) for m in members]
            self.targets[target_id] = loaded[0] if len(loaded) == 1 else Ensemble(loaded).eval()
        self.batch_size = batch_size
        self.fault_file = fault_file
        # Clean predictions per target and test position (-1: not computed yet).
        self.clean: dict[str, torch.Tensor] = {}
        self.passes = 0  # images sent through a target: the actor's share of the matrix's cost

    def ready(self) -> list[str]:
        """The target ids this actor holds (returns once they are loaded)."""
        return list(self.targets)

    def _check_fault(self) -> None:
        if self.fault_file and os.path.exists(self.fault_file):
            os.remove(self.fault_file)
            os._exit(1)

    def _predict(self, target_id: str, images: torch.Tensor) -> torch.Tensor:
        self.passes += len(images)
        return predict(self.targets[target_id], images, batch_size=self.batch_size, device=self.device)

    def _clean_correct(self, target_id: str, positions: torch.Tensor, images: torch.Tensor,
                       labels: torch.Tensor) -> torch.Tensor:
        """(M,) bool: does the target classify the clean test images at ``positions`` correctly."""
        cache = self.clean.setdefault(target_id, torch.full((len(labels),), -1, dtype=torch.int64))
        todo = positions[cache[positions] < 0]
        if len(todo):
            cache[todo] = self._predict(target_id, images[todo])
        return cache[positions] == labels[positions]

    def evaluate(self, adversarial_set: AdversarialSet, target_ids: Sequence[str], images: torch.Tensor,
                 labels: torch.Tensor) -> dict[str, DefenseCounts]:
        """Counts of each target against the set (``rm_sweep.evaluate.defense``'s definition).

        ``images`` (N, C, H, W) uint8 and ``labels`` (N,) are the test images the set was cut
        from; the set's ``indices`` are positions in them."""
        self._check_fault()
        out = {}
        for target_id in target_ids:
            clean_ok = self._clean_correct(target_id, adversarial_set.indices, images, labels)
            adversarial_ok = self._predict(target_id, adversarial_set.adversarial) == adversarial_set.labels
            out[target_id] = DefenseCounts.from_verdicts(clean_ok, adversarial_ok, n_crafted=adversarial_set.n_crafted,
                                                         n_fooled_source=adversarial_set.n_fooled_source)
        return out

    def perturb(self, protocol: str, value: float, limit: int, target_ids: Sequence[str], images: torch.Tensor,
                labels: torch.Tensor) -> dict[str, DefenseCounts]:
        """Counts of each target on the first ``limit`` of the test ``images`` (uint8) with
        Gaussian noise (``value`` = sigma in /255) or shuffled patches (``value`` = n), as
        ``rm_sweep.evaluate.noise`` / ``patch_shuffle`` count them."""
        self._check_fault()
        count = min(limit, len(labels))
        positions = torch.arange(count)
        perturb_batch = perturbation(protocol, value, seed=PERTURBATION_SEED)
        perturbed = [perturb_batch(images[batch].float().div_(255), batch)
                     for batch in positions.split(self.batch_size)]
        perturbed_images = torch.cat(perturbed) if perturbed else images[:0].float()
        out = {}
        for target_id in target_ids:
            clean_ok = self._clean_correct(target_id, positions, images, labels)
            perturbed_ok = self._predict(target_id, perturbed_images) == labels[:count]
            out[target_id] = DefenseCounts.from_verdicts(clean_ok, perturbed_ok, n_crafted=count, n_fooled_source=None)
        return out

    def forward_images(self) -> int:
        """Images this actor has sent through a target so far (clean and perturbed)."""
        return self.passes


# -- the driver --------------------------------------------------------------------------------
@dataclass(frozen=True)
class MatrixOptions:
    """How the matrix uses the cluster.

    Attributes:
        actors: target-shard actors (None: as many as the cluster holds beside one crafting
            task, at most one per target).
        cpus_per_craft, cpus_per_actor: CPUs each crafting task / actor reserves.
        gpus_per_craft, gpus_per_actor: GPU share of each (None: 0.5 and 0.25 when the cluster
            has GPUs, else 0); fractions let several small models share a card.
        batch_size: images per attack batch and per forward pass.
        max_restarts: how often a dead actor is restarted (its calls in flight are retried as
            often) and a failed crafting task retried.
        fault_file: test hook (module docstring).
    """

    actors: int | None = None
    cpus_per_craft: float = 1.0
    cpus_per_actor: float = 1.0
    gpus_per_craft: float | None = None
    gpus_per_actor: float | None = None
    batch_size: int = 256
    max_restarts: int = 3
    fault_file: str | None = None

    def __post_init__(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise UserError(f"actors must be at least 1, got {self.actors}")
        for name in ("cpus_per_craft", "cpus_per_actor"):
            if not getattr(self, name) > 0:
                raise UserError(f"{name.replace('_', ' ')} must be positive, got {getattr(self, name)}")
        for name in ("gpus_per_craft", "gpus_per_actor"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise UserError(f"{name.replace('_', ' ')} must be a share of one GPU in [0, 1], got {value}")
        if self.batch_size < 1 or self.max_restarts < 0:
            raise UserError(f"batch size must be >= 1 and max restarts >= 0, got {self.batch_size}, "
                            f"{self.max_restarts}")


@dataclass
class MatrixReport:
    """What a matrix run did: cells written, crafting runs, and forward-pass images."""

    cells: int = 0
    crafts: int = 0
    crafted_images: int = 0
    forward_images: int = 0
    actors: int = 0
    seconds: float = 0.0
    craft_seconds: list[float] = field(default_factory=list)


def _gpus(given: float | None, default: float) -> float:
    if given is not None:
        return given
    return default if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def _actor_count(options: MatrixOptions, targets: int, crafting: bool) -> int:
    """Actors to start: the requested number, or as many as fit beside one crafting task."""
    total = ray.cluster_resources().get("CPU", 0)
    spare = total - (options.cpus_per_craft if crafting else 0)
    if options.actors is not None:
        if crafting and options.actors * options.cpus_per_actor > spare:
            raise UserError(f"{options.actors} actors x {options.cpus_per_actor} CPUs leave no room for a "
                            f"{options.cpus_per_craft}-CPU crafting task on a {total:g}-CPU cluster")
        return min(options.actors, targets)
    return max(1, min(targets, int(spare // options.cpus_per_actor)))


def _get(refs: Any) -> Any:
    """``ray.get`` that turns a remote ``UserError`` back into a one-line ``UserError``."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, UserError):
            raise UserError(str(exc.cause)) from None
        raise


def run_matrix(
    cells: Sequence[MatrixCell],
    store: Store,
    images: torch.Tensor,
    labels: torch.Tensor,
    ensembles: Mapping[str, Sequence[str]],
    options: MatrixOptions = MatrixOptions(),
    *,
    progress: bool = True,
) -> MatrixReport:
    """Compute ``cells`` on the connected Ray cluster and add them to ``store``.

    Args:
        cells: the cells to compute (those the store lacks; see ``rm_sweep.matrix.missing_cells``).
        store: holds every model the cells name; rows are added as each job completes, so an
            interrupted run keeps what it finished.
        images: (N, C, H, W) uint8 test images in the order the cells' limits count them;
            labels: (N,) int64.
        ensembles: ensemble id -> member model ids, for every ensemble target.
        options: resources and actor count.
        progress: show a progress bar of cells.

    Returns:
        A ``MatrixReport``.
    """
    start = time.perf_counter()
    report = MatrixReport()
    if not cells:
        return report
    craft_jobs, perturb_jobs = plan(cells)
    targets: dict[str, list[str]] = {}
    for cell in cells:
        if cell.protocol != "white":
            targets[cell.target_id] = list(ensembles[cell.target_id]) if cell.target_kind == "ensemble" else [cell.target_id]
    needed = {m for members in targets.values() for m in members} | {j.source_id for j in craft_jobs}
    missing = sorted(needed - store.model_ids())
    if missing:
        raise UserError(f"store {store.uri} lacks model(s) {', '.join(missing)}: train them first (rm_sweep.sweep)")

    images_ref, labels_ref = ray.put(images), ray.put(labels)
    gpus_craft = _gpus(options.gpus_per_craft, 0.5)
    gpus_actor = _gpus(options.gpus_per_actor, 0.25)
    pending: dict[ray.ObjectRef, tuple[str, Any]] = {}
    for job in craft_jobs:
        summary_ref, set_ref = _craft_task.options(
            num_cpus=options.cpus_per_craft, num_gpus=gpus_craft, max_retries=options.max_restarts,
        ).remote(store.location(), job.source_id, job.setting, job.limit, images_ref, labels_ref,
                 options.batch_size, options.cpus_per_craft)
        pending[summary_ref] = ("crafted", (job, set_ref))
    report.crafts = len(craft_jobs)

    shards: list[tuple[Any, set[str]]] = []
    if targets:
        count = _actor_count(options, len(targets), bool(craft_jobs))
        actor_cls = TargetShard.options(num_cpus=options.cpus_per_actor, num_gpus=gpus_actor,
                                        max_restarts=options.max_restarts, max_task_retries=options.max_restarts)
        for group in shard_targets(targets, count):
            actor = actor_cls.remote(store.location(), group, options.cpus_per_actor, options.batch_size, options.fault_file)
            shards.append((actor, set(group)))
    report.actors = len(shards)

    outstanding: dict[int, int] = {}  # job number -> evaluation calls not yet returned
    rows: dict[int, list[dict[str, Any]]] = defaultdict(list)
    jobs: list[CraftJob | PerturbJob] = []

    def dispatch(job: CraftJob | PerturbJob, call: Callable[[Any, list[str]], ray.ObjectRef]) -> int:
        """Send ``job`` to every shard holding one of its targets; returns the job's number."""
        number = len(jobs)
        jobs.append(job)
        outstanding[number] = 0
        for actor, held in shards:
            ids = sorted({c.target_id for c in job.target_cells} & held)
            if ids:
                pending[call(actor, ids)] = ("evaluated", number)
                outstanding[number] += 1
        return number

    for job in perturb_jobs:
        dispatch(job, lambda actor, ids, job=job: actor.perturb.remote(job.protocol, job.value, job.limit, ids,
                                                                           images_ref, labels_ref))

    bar = tqdm(total=len(cells), desc="matrix cells", unit="cell", disable=not progress, dynamic_ncols=True)
    try:
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            kind, payload = pending.pop(ref)
            result = _get(ref)
            if kind == "crafted":
                job, set_ref = payload
                report.crafted_images += result["n_crafted"]
                report.craft_seconds.append(result["seconds"])
                number = dispatch(job, lambda actor, ids, set_ref=set_ref: actor.evaluate.remote(
                    set_ref, ids, images_ref, labels_ref))
                rows[number] += [cell_row(c, result["white"]) for c in job.cells if c.protocol == "white"]
            else:
                number = payload
                job = jobs[number]
                by_target = {c.target_id: c for c in job.target_cells}
                rows[number] += [cell_row(by_target[t], counts) for t, counts in result.items()]
                outstanding[number] -= 1
            if outstanding.get(number) == 0:
                report.cells += store.add_matrix(rows.pop(number))
                bar.update(len(jobs[number].cells))
                del outstanding[number]
        report.forward_images = sum(_get([actor.forward_images.remote() for actor, _ in shards]))
    finally:
        bar.close()
        for actor, _ in shards:
            ray.kill(actor)
    report.seconds = time.perf_counter() - start
    return report


__all__ = ["CraftJob", "MatrixOptions", "MatrixReport", "PerturbJob", "TargetShard", "cell_row", "cell_setting",
           "plan", "run_matrix", "shard_targets"]
