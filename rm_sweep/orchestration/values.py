"""What the Ray layer takes and reports, as plain values: no ``ray`` import, so commands and the
pipeline use them without starting (or importing) Ray."""
from __future__ import annotations

from dataclasses import dataclass, field

from rm_sweep import checks
from rm_sweep.errors import UserError

# The Tune function only waits for its trainer (Ray rejects 0 CPUs). Its share comes out of the
# trial's cpus_per_trial, so N trials of c CPUs fill N * c CPUs exactly: with the share on top,
# 2 trials of 1 CPU would not fit 2 CPUs and the second worker would wait for the first.
TRIAL_CPU = 0.01


@dataclass(frozen=True)
class TrialTiming:
    """Where a trial's wall time went, in seconds (measured inside the trial).

    ``startup``: Tune function start -> worker loop start (Train controller, worker group);
    ``setup``: data loading and model construction in the worker; ``train``: ``fit``'s own
    time over all epochs (resumed runs included); ``total``: the whole Tune function.
    """

    startup: float
    setup: float
    train: float
    total: float

    @property
    def other(self) -> float:
        """Reporting and checkpoint upload per epoch, store write, shutting the trainer down."""
        return self.total - self.startup - self.setup - self.train


@dataclass
class SweepResult:
    """What a sweep did, by model id: trained now, found in the store, failed (id -> error),
    unfinished (the sweep was interrupted; running it again continues them) or leased (id ->
    which other live run is training it). Notes on the way: ``damaged`` (id -> why a stored
    model was trained again: its checkpoint was missing or damaged), ``restarted`` (id -> why an
    earlier training state was not resumed), ``removed_states`` (stored models whose leftover
    training state was deleted)."""

    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    unfinished: list[str] = field(default_factory=list)
    leased: dict[str, str] = field(default_factory=dict)
    damaged: dict[str, str] = field(default_factory=dict)
    restarted: dict[str, str] = field(default_factory=dict)
    removed_states: list[str] = field(default_factory=list)
    timings: dict[str, TrialTiming] = field(default_factory=dict)
    epochs_reported: dict[str, list[int]] = field(default_factory=dict)
    # Each reported epoch's metrics (``rm_sweep.train.fit``'s), in order of arrival.
    epoch_metrics: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    ray_init_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Whether the store now holds every model the sweep was asked for."""
        return not self.failed and not self.unfinished and not self.leased


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
    """

    actors: int | None = None
    cpus_per_craft: float = 1.0
    cpus_per_actor: float = 1.0
    gpus_per_craft: float | None = None
    gpus_per_actor: float | None = None
    batch_size: int = 256
    max_restarts: int = 3

    def __post_init__(self) -> None:
        if self.actors is not None:
            checks.positive_int(self.actors, "actors")
        for name in ("cpus_per_craft", "cpus_per_actor"):
            checks.positive(getattr(self, name), name.replace("_", " "))
        for name in ("gpus_per_craft", "gpus_per_actor"):
            value = getattr(self, name)
            if value is not None and not 0 <= checks.number(value, name.replace("_", " ")) <= 1:
                raise UserError(f"{name.replace('_', ' ')} must be a share of one GPU in [0, 1], got {value}")
        checks.positive_int(self.batch_size, "batch size")
        checks.positive(self.max_restarts, "max restarts", integer=True, strict=False)


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


__all__ = ["TRIAL_CPU", "MatrixOptions", "MatrixReport", "SweepResult", "TrialTiming"]
