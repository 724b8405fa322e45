"""fit(): the paper's training loop (SGD with momentum, step schedule), resumable and seeded.

    python -m rm_sweep.train --data folder:../shared/data/cifar10-jpeg --arch resnet18 --width 0.25 \\
        --shallow 0.7 --recipe quick --train-subset 5000 --test-subset 1000 --out runs/demo

Data stays on the training device (``rm_sweep.data.DeviceLoader``). On CUDA the forward pass runs
under bf16 autocast and the model is compiled with CUDA graphs unless told otherwise (2.2-2.7x
the eager step rate on an H200); channels-last memory format is used on every device (1.5-2.6x
faster for ResNets on this project's CPUs too). The final model is the last epoch's: nothing is
selected on the test set.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from rm_sweep import checks, cli
from rm_sweep.atomic import atomic_torch_save
from rm_sweep.data import Dataset, DeviceLoader, load_dataset
from rm_sweep.errors import UserError, cannot_read, cli_main
from rm_sweep.evaluate import device_name
from rm_sweep.masks import MaskConfig
from rm_sweep.models import check_arch, count_parameters, create_model, save_checkpoint
from rm_sweep.recipes import RECIPES, Recipe, get_recipe
from rm_sweep.spec import parse_data_spec

STATE_FILE = "train_state.pt"
_STATE_FORMAT = "rm_sweep.train_state/1"
EVAL_BATCH = 1000  # evaluation holds no activations for backward: large batches are cheap
DEVICES = ("cpu", "cuda")
MAX_THREADS = 1024


def resolve_device(device: torch.device | str | None = None) -> torch.device:
    """``device`` as a ``torch.device``; CUDA when available if None."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {str(device)!r}; use cpu, cuda or cuda:N") from None
    checks.choice(device.type, DEVICES, "device type")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda was requested but CUDA is not available")
    return device


def compiles_by_default(device: torch.device) -> bool:
    """What ``fit(compile=None)`` does on ``device``: compile on CUDA, not on the CPU."""
    return device.type == "cuda"


def compile_for_training(model: nn.Module, device: torch.device) -> nn.Module:
    """``torch.compile`` as ``fit(compile=True)`` uses it on ``device``.

    On CUDA with CUDA graphs (mode ``reduce-overhead``): a batch-128 CIFAR step launches a few
    hundred small kernels and, eager, is bound by launching them (7-9 ms per step on an H200
    whatever the width); a graph replays the forward and the backward pass in one launch each.
    On a CPU, Inductor's default mode (there are no CUDA graphs to replay). Graph outputs are
    overwritten by the next replay, so a training loop must fold them into its own tensors
    before the next step, as ``train_epoch`` does (each forward is followed by its backward,
    which is how CUDA graph trees tell iterations apart).
    """
    return torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else None)


def train_epoch(
    net: nn.Module,
    loader: DeviceLoader,
    optimizer: torch.optim.Optimizer,
    *,
    amp: bool,
    on_step: Callable[[], None] | None = None,
) -> tuple[float, float]:
    """One pass over ``loader`` with cross-entropy loss; returns (mean loss, accuracy in [0, 1]).

    ``amp`` runs the forward pass under bf16 autocast (CUDA). Running sums stay on the device
    so the loop never waits for the GPU until the epoch ends.
    """
    net.train()
    device = loader.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    for images, labels in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = net(images)
            loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach().float() * len(labels)
        correct += (logits.detach().argmax(1) == labels).sum()
        seen += len(labels)
        if on_step is not None:
            on_step()
    return loss_sum.item() / seen, correct.item() / seen


@torch.inference_mode()
def _accuracy(net: nn.Module, loader: DeviceLoader, amp: bool) -> float:
    was_training = net.training
    net.eval()
    correct, seen = torch.zeros((), device=loader.device, dtype=torch.int64), 0
    for images, labels in loader:
        with torch.autocast(loader.device.type, dtype=torch.bfloat16, enabled=amp):
            correct += (net(images).argmax(1) == labels).sum()
        seen += len(labels)
    net.train(was_training)
    return correct.item() / seen


def evaluate_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int = EVAL_BATCH,
    device: torch.device | str | None = None,
) -> float:
    """Clean accuracy in [0, 1] of ``model`` (eval mode, float32) on uint8 images (N, C, H, W)
    with int64 labels (N,); ``device`` defaults to the model's."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    return _accuracy(model, DeviceLoader(x, y, batch_size, device=device), amp=False)


def fit(
    model: nn.Module,
    data: Dataset,
    recipe: Recipe,
    report: Callable[[dict[str, Any], Path | None], None] | None = None,
    *,
    state_dir: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
    compile: bool | None = None,
    progress: bool = False,
    on_unusable_state: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place on ``data.train_*`` with ``recipe``; returns the final metrics.

    If ``state_dir/train_state.pt`` exists, training resumes from it (it must come from the same
    model config, data, recipe and seed, and is loaded weights-only: tensors and plain values,
    never arbitrary objects). One that cannot be resumed raises ``UserError``, or, given
    ``on_unusable_state``, is passed to it (why, one line), deleted, and training starts over.
    After every epoch the full state (weights, optimizer,
    schedule, random generators) is written there atomically and ``report(metrics, state_dir)``
    is called with ``epoch``, ``train_loss``, ``train_accuracy``, ``test_accuracy``,
    ``images_per_second``, ``lr``, ``epoch_seconds`` and ``train_seconds``. An interrupted and
    resumed run ends with the same weights as an uninterrupted one (bit for bit on CPU).

    ``seed`` fixes the data order and augmentation (initialise the model's weights under a seed
    before calling). ``compile`` (``compile_for_training``) defaults to on for CUDA, where ~15 s
    of compiling buys CIFAR-10 epochs in less than half the eager time, and off on the CPU,
    where compiling costs more than it saves in short runs. The returned dict holds the last
    epoch's metrics plus ``clean_accuracy`` (float32 test accuracy of the returned model),
    ``epochs`` and ``device``. The model is left on ``device`` in the default memory format.
    An epoch whose mean loss is not finite (a learning rate too large) raises ``UserError``
    naming it, before its state is written or reported. ``progress``: a bar of training steps
    on stderr when it is a terminal.
    """
    device = resolve_device(device)
    amp = device.type == "cuda"
    compile = compiles_by_default(device) if compile is None else compile
    if amp:
        torch.backends.cudnn.benchmark = True  # every training batch has one shape: tuned kernels pay off
    state_path = Path(state_dir) / STATE_FILE if state_dir is not None else None
    model.to(device=device, memory_format=torch.channels_last)
    net = compile_for_training(model, device) if compile else model
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay, nesterov=False)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(recipe.milestones), recipe.gamma)
    generator = torch.Generator().manual_seed(seed)
    augment = data.augment if recipe.augment == "auto" else recipe.augment
    train_loader = DeviceLoader(data.train_x, data.train_y, recipe.batch_size, device=device, augment=augment,
                                shuffle=True, drop_last=True, generator=generator, channels_last=True)
    test_loader = DeviceLoader(data.test_x, data.test_y, EVAL_BATCH, device=device, channels_last=True)
    identity = _json_roundtrip({
        "model": model.config.to_dict() if hasattr(model, "config") else type(model).__name__,
        "data": data.name, "train_size": len(data.train_x), "test_size": len(data.test_x),
        "augment": augment, "recipe": recipe.to_dict(), "seed": seed,
    })
    start, history = 0, []
    state = None
    if state_path is not None and state_path.exists():
        try:
            state = _read_state(state_path, identity)
        except _UnusableState as exc:
            if on_unusable_state is None:
                raise UserError(f"{exc}; {exc.advice}") from None
            on_unusable_state(str(exc))
            state_path.unlink()
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            generator.set_state(state["loader_rng"])
            torch.set_rng_state(state["torch_rng"])
            if amp and "cuda_rng" in state:
                torch.cuda.set_rng_state(state["cuda_rng"], device)
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            # Partly loaded by now, so not a state to fall back from: the run stops.
            raise UserError(f"training state {state_path} does not fit this run ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0]}); delete it to start over") from None
        start, history = state["epoch"], list(state["history"])
    elapsed = history[-1]["train_seconds"] if history else 0.0

    # On a terminal only (tqdm's None): a log or a pipe gets the one JSON line and, on failure,
    # the one error line, not the bar's carriage-return redraws before them.
    bar = tqdm(total=(recipe.epochs - start) * len(train_loader), desc="train", unit="step",
               disable=None if progress else True, dynamic_ncols=True)
    try:
        for epoch in range(start, recipe.epochs):
            t0 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            train_loss, train_acc = train_epoch(net, train_loader, optimizer, amp=amp, on_step=bar.update)
            train_time = time.perf_counter() - t0
            if not math.isfinite(train_loss):
                # Weights past this point are not a model: stop before they are saved anywhere.
                raise UserError(f"training diverged in epoch {epoch + 1} of {recipe.epochs}: the loss is "
                                f"{train_loss} (learning rate {lr:g}); nothing was saved from this epoch")
            scheduler.step()
            if epoch + 1 == recipe.epochs:
                # The final figure is what any reader of the checkpoint will measure: float32,
                # default memory format, not the compiled or autocast training-time path.
                model.to(memory_format=torch.contiguous_format)
                test_acc = evaluate_accuracy(model, data.test_x, data.test_y, device=device)
            else:
                test_acc = _accuracy(net, test_loader, amp)
            elapsed += time.perf_counter() - t0
            metrics = {
                "epoch": epoch + 1, "train_loss": train_loss, "train_accuracy": train_acc,
                "test_accuracy": test_acc, "images_per_second": len(train_loader) * train_loader.batch_size / train_time,
                "lr": lr, "epoch_seconds": time.perf_counter() - t0, "train_seconds": elapsed,
            }
            history.append(metrics)
            bar.set_postfix(epoch=epoch + 1, loss=f"{train_loss:.3f}", test_acc=f"{test_acc:.3f}")
            if state_path is not None:
                atomic_torch_save({
                    "format": _STATE_FORMAT, "identity": identity, "epoch": epoch + 1,
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "loader_rng": generator.get_state(),
                    "torch_rng": torch.get_rng_state(), "history": history,
                    **({"cuda_rng": torch.cuda.get_rng_state(device)} if amp else {}),
                }, state_path)
            if report is not None:
                report(dict(metrics), state_path.parent if state_path is not None else None)
    finally:
        bar.close()
        model.to(memory_format=torch.contiguous_format)
    final = history[-1]
    return {**final, "clean_accuracy": final["test_accuracy"], "epochs": recipe.epochs, "device": device_name(device)}


def _json_roundtrip(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


class _UnusableState(UserError):
    """A training state that cannot be resumed: the message says why, ``advice`` what to do."""

    def __init__(self, reason: str, advice: str) -> None:
        super().__init__(reason)
        self.advice = advice


def _read_state(path: Path, identity: dict[str, Any]) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:  # present but not readable: not a reason to delete it
        raise cannot_read(f"training state {path}", exc) from None
    except Exception as exc:  # any file that is not a torch file is the same problem to the user
        raise _UnusableState(f"training state {path} is corrupt ({type(exc).__name__})", "delete it to start over") \
            from None
    if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
        raise _UnusableState(f"{path} is not an rm_sweep training state", "delete it to start over")
    differ = sorted(k for k in identity if not isinstance(state.get("identity"), dict)
                    or state["identity"].get(k) != identity[k])
    if differ:
        raise _UnusableState(f"{path} belongs to a different run ({', '.join(differ)} differ)",
                             "use another directory")
    problem = _state_problem(state)
    if problem is not None:
        raise _UnusableState(f"training state {path} is damaged ({problem})", "delete it to start over")
    return state


def _state_problem(state: dict[str, Any]) -> str | None:
    """What in a training state of the right format and run cannot be resumed (a field missing
    or of another type), checked before any of it is loaded; None if nothing."""
    for key, kind in (("model", dict), ("optimizer", dict), ("scheduler", dict), ("epoch", int), ("history", list)):
        if not isinstance(state.get(key), kind):
            return f"its {key} is missing or not a {kind.__name__}"
    for key in ("loader_rng", "torch_rng"):
        if not (isinstance(state.get(key), torch.Tensor) and state[key].dtype == torch.uint8):
            return f"its {key} is not a generator state"
    history = state["history"]
    if len(history) != state["epoch"] or not all(isinstance(h, dict) and isinstance(h.get("train_seconds"), float)
                                                 for h in history):
        return f"its history does not hold epochs 1-{state['epoch']}"
    return None


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.parser("python -m rm_sweep.train", "Train one (Random Mask) model; rerunning the same command resumes "
                                               "it. Writes OUT/model.pt and prints one JSON line of results.")
    p.add_argument("--data", required=True, help="cifar10, mnist or folder:PATH (ImageFolder with train/ and test/)")
    p.add_argument("--data-dir", help="downloads and decoded caches (default $RM_SWEEP_DATA_DIR or ~/.cache/rm_sweep)")
    p.add_argument("--arch", required=True, help="architecture, e.g. resnet18 (see rm_sweep.models.list_models)")
    p.add_argument("--width", type=cli.positive(), default=1.0, help="channel width factor of the whole network")
    p.add_argument("--shallow", type=float, default=0.0, help="drop ratio of the shallow blocks")
    p.add_argument("--deep", type=float, default=0.0, help="drop ratio of the deep blocks")
    p.add_argument("--variant", default="random", help="mask variant: random, same or channel")
    p.add_argument("--channel-multiplier", type=float, default=1.0, help="width factor of the masked blocks")
    p.add_argument("--seed", type=cli.seed(), default=0, help="weight init, data order and augmentation")
    p.add_argument("--mask-seed", type=cli.seed(), default=0,
                   help="which neurons are masked (default: 0, as in a search space)")
    p.add_argument("--recipe", help=f"one of {', '.join(RECIPES)} (default: paper-mnist for mnist, else paper)")
    p.add_argument("--epochs", type=cli.count(), help="override the recipe's epochs (milestones keep their fractions)")
    p.add_argument("--lr", type=cli.positive(), help="override the initial learning rate")
    p.add_argument("--milestones", help="override the lr milestones, e.g. 150,250 ('' for none)")
    p.add_argument("--batch-size", type=cli.count(), help="override the batch size")
    p.add_argument("--train-subset", type=cli.count(),
                   help="train on N images, equal per class (fixed, seed 0)")
    p.add_argument("--test-subset", type=cli.count(),
                   help="test on N images, equal per class (fixed, seed 0)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the model (default: on CUDA, with CUDA graphs; off on the CPU)")
    # OpenMP crashes (SIGSEGV, no message) asked for some 10**5 threads: a bound far above any machine.
    p.add_argument("--threads", type=cli.count(maximum=MAX_THREADS),
                   help="CPU threads for torch (default: torch's choice, one per core)")
    p.add_argument("--out", required=True, help="run directory: training state, model.pt")
    return p.parse_args(argv)


def _parse_milestones(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(m) for m in text.split(",") if m.strip())
    except ValueError:
        raise UserError(f"--milestones must be comma-separated epochs, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    check_arch(args.arch)  # before minutes of data decoding, not after
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    spec = parse_data_spec(args.data)
    recipe = get_recipe(args.recipe or ("paper-mnist" if spec.kind == "mnist" else "paper"),
                        epochs=args.epochs, lr=args.lr, milestones=_parse_milestones(args.milestones),
                        batch_size=args.batch_size)
    mask = MaskConfig(shallow_ratio=args.shallow, deep_ratio=args.deep, variant=args.variant,
                      channel_multiplier=args.channel_multiplier, seed=args.mask_seed)
    device = resolve_device(args.device)
    out = cli.output_dir(args.out, "the run directory (training state and model.pt)")
    cli.written_beside(out, files=(out / "model.pt", out / STATE_FILE))
    # Subsets use seed 0 whatever --seed is, so runs that differ in seed see the same images.
    data = load_dataset(spec, data_dir=args.data_dir, train_subset=args.train_subset, test_subset=args.test_subset)
    torch.manual_seed(args.seed)
    model = create_model(args.arch, num_classes=data.num_classes, in_channels=data.in_channels,
                         image_size=data.image_size, mask=mask, width=args.width, mean=data.mean, std=data.std)
    metrics = fit(model, data, recipe, state_dir=out, device=device, seed=args.seed, compile=args.compile,
                  progress=True)
    result = {
        **metrics, "arch": args.arch, "data": data.name, "train_size": len(data.train_x),
        "test_size": len(data.test_x), "recipe": recipe.to_dict(), "seed": args.seed,
        "model_config": model.config.to_dict(), "parameters": count_parameters(model),
        "checkpoint": str(out / "model.pt"),
    }
    save_checkpoint(model.cpu(), out / "model.pt", extra={k: v for k, v in result.items() if k != "model_config"})
    print(json.dumps(result))
    return 0


__all__ = ["compile_for_training", "compiles_by_default", "evaluate_accuracy", "fit",
           "resolve_device", "train_epoch"]

if __name__ == "__main__":
    cli_main(main)
