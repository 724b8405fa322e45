"""The attack matrix on Ray: crafting tasks, and a pool of actors that hold the targets.

Cost is what the protocols need and no more: one crafting run per (source, attack setting,
limit), shared by its black-, gray- and white-box cells, and one forward pass per (job, target)
plus one clean pass per target over the test images it is asked about (``Target`` caches clean
verdicts: every job is cut from the same test images). Never one attack per cell.

    driver ──craft task (source, setting)──► Job with its AdversarialSet in the object store
       │                                           │ ObjectRef, never through the driver
       └── TargetShard actors (each loads its shard of targets once, ensembles included)
              count(job, cells) ──► counts ──► driver ──► store.add_matrix (one file per job)

Every protocol is a unit of ``rm_sweep.protocols``: the crafting task and the actors only call
``Protocol.count``. Why not ``ray.util.ActorPool``: it hands each work item to whichever actor is
idle, which assumes interchangeable actors. Here each actor holds a different shard of the targets
(so the pool's memory is one copy of every target, not one per actor), and every job must reach
every shard that holds one of its targets: work is addressed to a given actor. Fault tolerance
comes from Ray itself: a shard actor that dies is restarted (``max_restarts``; its ``__init__``
reloads its shard) and the calls in flight are retried (``max_task_retries``); crafting tasks are
retried by Ray (``max_retries``). Every call is a pure function of its inputs, so a retry gives the
same counts, and the driver keeps one result per cell. Sets larger than the object store's memory
spill to local disk (Ray's own spilling); nothing here holds a whole set in the driver.
"""
from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import ray
import torch
from torch import nn
from tqdm import tqdm

from rm_sweep.ensemble import Ensemble
from rm_sweep.errors import UserError
from rm_sweep.evaluate import DefenseCounts, Target, craft, device_name
from rm_sweep.orchestration import faults
from rm_sweep.orchestration.values import MatrixOptions, MatrixReport
from rm_sweep.protocols import PROTOCOLS, Job
from rm_sweep.spec import MatrixCell
from rm_sweep.store import Store


# -- planning (pure) ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """Cells run together: the crafting protocols' cells of one (source, setting, limit) share
    one adversarial set; the other protocols' cells of one (protocol, parameters, limit) one job."""

    source_id: str | None
    job: Job
    cells: tuple[MatrixCell, ...]

    @property
    def target_cells(self) -> tuple[MatrixCell, ...]:
        """The cells an actor counts (a white-box cell is counted from the crafted set itself)."""
        return tuple(c for c in self.cells if PROTOCOLS[c.protocol].source != "self")


def plan(cells: Sequence[MatrixCell]) -> list[Plan]:
    """Group cells into plans, crafting ones first, in first-seen order."""
    groups: dict[tuple, list[MatrixCell]] = defaultdict(list)
    for cell in cells:
        crafted = PROTOCOLS[cell.protocol].crafts
        groups[(not crafted, cell.source_id if crafted else cell.protocol, cell.attack, cell.attack_params,
                cell.limit)].append(cell)
    return [Plan(group[0].source_id if not key[0] else None,
                 Job(key[2], json.loads(key[3]), key[4]), tuple(group))
            for key, group in sorted(groups.items(), key=lambda kv: kv[0][0])]


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


def cell_row(cell: MatrixCell, counts: DefenseCounts, device: str) -> dict[str, Any]:
    """The store's matrix row for a cell and its counts, computed on ``device`` (``device_name``)."""
    return {**asdict(cell), **counts.as_dict(), "device": device}


# -- remote work -------------------------------------------------------------------------------
def _device() -> torch.device:
    """The GPU Ray assigned to this task or actor, else the CPU."""
    return torch.device("cuda") if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")


def _use_cpus(cpus: float) -> None:
    # Ray reserves CPUs but does not stop torch from starting a thread per core; one thread per
    # reserved CPU keeps concurrent tasks from fighting over the same cores.
    torch.set_num_threads(max(1, int(cpus)))


def _load(store: Store, members: Sequence[str], device: torch.device, loaded: dict[str, nn.Module]) -> nn.Module:
    """A model, or the ensemble of ``members``, from the store (each member loaded once)."""
    models = [loaded.setdefault(m, store.load_model(m).to(device)) for m in members]
    return models[0] if len(models) == 1 else Ensemble(models).eval()


@ray.remote(num_returns=2)
def _craft_task(store_uri: str, members: Sequence[str], plan_: Plan, images: torch.Tensor, labels: torch.Tensor,
                batch_size: int, cpus: float) -> tuple[dict[str, Any], Job]:
    """Craft one adversarial set on the source (a model or an ensemble); returns a small summary
    for the driver (with the white-box counts, which need no target) and the job holding the set
    (for the actors: it stays in the object store)."""
    _use_cpus(cpus)
    start = time.perf_counter()
    device = _device()
    source = _load(Store(store_uri), members, device, {})
    job = plan_.job
    adversarial_set = craft(source, images, labels, job.setting(), job.limit, source_id=plan_.source_id,
                            batch_size=batch_size)
    job = Job(job.attack, job.params, job.limit, adversarial_set)
    counts = {c.protocol: PROTOCOLS[c.protocol].count(None, job, images, labels)
              for c in plan_.cells if PROTOCOLS[c.protocol].source == "self"}
    return {"n_crafted": adversarial_set.n_crafted, "self": counts, "device": device_name(device),
            "seconds": time.perf_counter() - start}, job


@ray.remote
class TargetShard:
    """Holds a shard of the targets (models and ensembles) and counts jobs on them.

    The test images come with every call (from the object store: one copy per node) rather than
    with the constructor, so a restarted actor needs nothing but the store to rebuild itself.

    Args:
        store_uri: where the models' checkpoints are.
        targets: target id -> member model ids (one for a model, N for an ensemble).
        cpus: CPUs reserved for this actor (torch threads). batch_size: images per forward pass.
    """

    def __init__(self, store_uri: str, targets: Mapping[str, Sequence[str]], cpus: float, batch_size: int) -> None:
        _use_cpus(cpus)
        device = _device()
        self.device = device_name(device)
        store, loaded = Store(store_uri), {}
        # A target that cannot be loaded (its checkpoint deleted since the driver checked) is a
        # UserError raised by the first call, which the driver reports in one line: raised here,
        # it would kill the actor and surface as an actor death with a traceback.
        self.error: UserError | None = None
        try:
            self.targets = {target_id: Target(_load(store, members, device, loaded), batch_size=batch_size,
                                              device=device) for target_id, members in targets.items()}
        except UserError as exc:
            self.targets, self.error = {}, exc

    def count(self, job: Job, cells: Sequence[tuple[str, str]], images: torch.Tensor,
              labels: torch.Tensor) -> tuple[str, dict[tuple[str, str], DefenseCounts]]:
        """This actor's device (``device_name``) and the counts of each (protocol, target id) on
        ``job``; ``images`` (N, C, H, W) uint8 and ``labels`` (N,) are the test images the job's
        images come from."""
        if self.error is not None:
            raise self.error
        faults.inject("call", "count")
        return self.device, {(protocol, target_id): PROTOCOLS[protocol].count(self.targets[target_id], job, images,
                                                                              labels)
                             for protocol, target_id in cells}

    def forward_images(self) -> int:
        """Images this actor has sent through a target so far (clean and attacked)."""
        return sum(t.passes for t in self.targets.values())


# -- the driver --------------------------------------------------------------------------------
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
        cells: the cells to compute (those the store lacks: ``rm_sweep.pipeline.missing_cells``).
        store: holds every model the cells name; rows are added as each plan completes, so an
            interrupted run keeps what it finished.
        images: (N, C, H, W) uint8 test images in the order the cells' limits count them;
            labels: (N,) int64.
        ensembles: ensemble id -> member model ids, for every ensemble source or target.
        options: resources and actor count. progress: show a progress bar of cells.
    """
    start = time.perf_counter()
    report = MatrixReport()
    if not cells:
        return report
    plans = plan(cells)

    def members(unit_id: str) -> list[str]:
        return list(ensembles.get(unit_id, [unit_id]))

    targets = {c.target_id: members(c.target_id) for p in plans for c in p.target_cells}
    needed = {m for ids in targets.values() for m in ids} | {m for p in plans if p.source_id for m in members(p.source_id)}
    unusable = store.unusable(sorted(needed))
    if unusable:
        reasons = "; ".join(f"{m}: {reason}" for m, reason in unusable.items())
        raise UserError(f"store {store.uri} cannot serve {len(unusable)} model(s) ({reasons}): train them first "
                        "(rm_sweep.sweep)")

    images_ref, labels_ref = ray.put(images), ray.put(labels)
    crafting = [p for p in plans if p.source_id is not None]
    pending: dict[ray.ObjectRef, tuple[str, Any]] = {}
    for p in crafting:
        summary_ref, job_ref = _craft_task.options(
            num_cpus=options.cpus_per_craft, num_gpus=_gpus(options.gpus_per_craft, 0.5),
            max_retries=options.max_restarts,
        ).remote(store.location(), members(p.source_id), p, images_ref, labels_ref, options.batch_size,
                 options.cpus_per_craft)
        pending[summary_ref] = ("crafted", (p, job_ref))
    report.crafts = len(crafting)

    shards: list[tuple[Any, set[str]]] = []
    if targets:
        actor_cls = TargetShard.options(num_cpus=options.cpus_per_actor, num_gpus=_gpus(options.gpus_per_actor, 0.25),
                                        max_restarts=options.max_restarts, max_task_retries=options.max_restarts)
        for group in shard_targets(targets, _actor_count(options, len(targets), bool(crafting))):
            shards.append((actor_cls.remote(store.location(), group, options.cpus_per_actor, options.batch_size),
                           set(group)))
    report.actors = len(shards)

    outstanding: dict[int, int] = {}  # plan number -> count calls not yet returned
    rows: dict[int, list[dict[str, Any]]] = defaultdict(list)
    numbered: list[Plan] = []

    def dispatch(p: Plan, job: Any) -> int:
        """Send ``job`` to every shard holding one of the plan's targets; returns its number."""
        number = len(numbered)
        numbered.append(p)
        outstanding[number] = 0
        for actor, held in shards:
            pairs = sorted({(c.protocol, c.target_id) for c in p.target_cells if c.target_id in held})
            if pairs:
                pending[actor.count.remote(job, pairs, images_ref, labels_ref)] = ("counted", number)
                outstanding[number] += 1
        return number

    for p in plans:
        if p.source_id is None:
            dispatch(p, p.job)

    bar = tqdm(total=len(cells), desc="matrix cells", unit="cell", disable=not progress, dynamic_ncols=True)
    try:
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            kind, payload = pending.pop(ref)
            result = _get(ref)
            if kind == "crafted":
                p, job_ref = payload
                report.crafted_images += result["n_crafted"]
                report.craft_seconds.append(result["seconds"])
                number = dispatch(p, job_ref)
                rows[number] += [cell_row(c, result["self"][c.protocol], result["device"]) for c in p.cells
                                 if PROTOCOLS[c.protocol].source == "self"]
            else:
                number = payload
                device, counted = result
                by_key = {(c.protocol, c.target_id): c for c in numbered[number].target_cells}
                rows[number] += [cell_row(by_key[key], counts, device) for key, counts in counted.items()]
                outstanding[number] -= 1
            if outstanding.get(number) == 0:
                report.cells += store.add_matrix(rows.pop(number))
                bar.update(len(numbered[number].cells))
                del outstanding[number]
        report.forward_images = sum(_get([actor.forward_images.remote() for actor, _ in shards]))
    finally:
        bar.close()
        for actor, _ in shards:
            ray.kill(actor)
    report.seconds = time.perf_counter() - start
    return report


__all__ = ["Plan", "TargetShard", "cell_row", "plan", "run_matrix", "shard_targets"]
