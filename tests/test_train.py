"""rm_sweep.train: recipes, fit (learning, resuming, reporting) and the training command."""
from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rm_sweep.data import Dataset, DeviceLoader, load_dataset
from rm_sweep.errors import UserError, cli_main
from rm_sweep.masks import MaskConfig
from rm_sweep.models import create_model, list_models, load_checkpoint
from rm_sweep.recipes import get_recipe
from rm_sweep.spec import ModelSpec
from rm_sweep.train import STATE_FILE, evaluate_accuracy, fit, main

from imagefolder import write_image_folder


def test_paper_recipes_are_the_papers() -> None:
    paper = get_recipe("paper")
    assert (paper.epochs, paper.lr, paper.milestones, paper.gamma) == (350, 0.1, (150, 250), 0.1)
    assert (paper.momentum, paper.weight_decay, paper.batch_size, paper.augment) == (0.9, 5e-4, 128, "auto")
    mnist = get_recipe("paper-mnist")
    assert (mnist.epochs, mnist.milestones) == (50, (20, 40))


@pytest.mark.parametrize("overrides, expected", [
    ({"epochs": 35}, {"epochs": 35, "milestones": (15, 25)}),
    ({"epochs": 2}, {"epochs": 2, "milestones": (1,)}),
    ({"epochs": 35, "milestones": [5]}, {"epochs": 35, "milestones": (5,)}),
    ({"lr": 0.01, "batch_size": 32, "epochs": None}, {"lr": 0.01, "batch_size": 32, "epochs": 350}),
])
def test_recipe_overrides(overrides: dict, expected: dict) -> None:
    recipe = get_recipe("paper", **overrides)
    assert {k: getattr(recipe, k) for k in expected} == expected


@pytest.mark.parametrize("name, overrides, message", [
    ("fast", {}, "unknown recipe"),
    ("paper", {"epochs": 0}, "epochs"),
    ("paper", {"lr": -1.0}, "lr"),
    ("paper", {"milestones": [250, 150]}, "milestones"),
    ("paper", {"augment": "cutout"}, "augmentation"),
    ("paper", {"nesterov": True}, "recipe.nesterov: unknown field"),
])
def test_bad_recipe_is_a_user_error(name: str, overrides: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        get_recipe(name, **overrides)


@pytest.fixture(scope="module")
def cifar(cifar_folder: Path, data_dir: Path):
    """1,000 training and 500 test images of the shared CIFAR-10 JPEGs."""
    return load_dataset(f"folder:{cifar_folder}", data_dir=data_dir, train_subset=1000, test_subset=500)


def _tiny_model(data, seed: int = 0, shallow: float = 0.0):
    torch.manual_seed(seed)
    return create_model("resnet18", width=0.125, mask=MaskConfig(shallow_ratio=shallow, seed=1),
                        mean=data.mean, std=data.std)


def test_a_tiny_model_learns_real_images(cifar) -> None:
    model = _tiny_model(cifar)
    # Without augmentation a few steps learn fastest; 0.2 is 8 standard errors above chance (0.1)
    # on 500 test images, while runs of this setting reach ~0.3.
    recipe = get_recipe("quick", epochs=3, batch_size=32, lr=0.02, augment="none")
    metrics = fit(model, cifar, recipe, device="cpu")
    assert metrics["clean_accuracy"] > 0.2
    assert metrics["clean_accuracy"] == evaluate_accuracy(model, cifar.test_x, cifar.test_y)
    assert metrics["train_loss"] < 2.0  # ln 10 = 2.30 at chance


def test_report_gets_every_epoch_after_its_state_is_saved(cifar, tmp_path: Path) -> None:
    seen = []

    def report(metrics: dict, state_dir: Path | None) -> None:
        saved = torch.load(state_dir / STATE_FILE, weights_only=True)
        seen.append((metrics["epoch"], saved["epoch"], sorted(metrics)))

    small = _subset(cifar, 64, 50)
    fit(_tiny_model(small), small, get_recipe("quick", epochs=2, batch_size=32), report, state_dir=tmp_path)
    keys = sorted(["epoch", "train_loss", "train_accuracy", "test_accuracy", "images_per_second", "lr",
                   "epoch_seconds", "train_seconds"])
    assert seen == [(1, 1, keys), (2, 2, keys)]


def _subset(data, n_train: int, n_test: int):
    return replace(data, train_x=data.train_x[:n_train], train_y=data.train_y[:n_train],
                   test_x=data.test_x[:n_test], test_y=data.test_y[:n_test])


class Interrupt(Exception):
    pass


def test_resumed_run_equals_uninterrupted_run_bit_for_bit(cifar, tmp_path: Path) -> None:
    data = _subset(cifar, 96, 50)
    recipe = get_recipe("quick", epochs=3, batch_size=32, milestones=[2])
    whole = _tiny_model(data, shallow=0.5)
    expected = fit(whole, data, recipe, seed=7, device="cpu")

    def stop_after_first_epoch(metrics: dict, state_dir: Path | None) -> None:
        if metrics["epoch"] == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        fit(_tiny_model(data, shallow=0.5), data, recipe, stop_after_first_epoch, state_dir=tmp_path, seed=7)
    resumed = _tiny_model(data, seed=99, shallow=0.5)  # different initial weights: the state must win
    got = fit(resumed, data, recipe, state_dir=tmp_path, seed=7, device="cpu")
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert {k: got[k] for k in ("train_loss", "test_accuracy", "lr")} == \
        {k: expected[k] for k in ("train_loss", "test_accuracy", "lr")}


@pytest.mark.parametrize("change", [{"seed": 8}, {"recipe": {"lr": 0.2}}])
def test_resuming_a_different_run_is_refused(cifar, tmp_path: Path, change: dict) -> None:
    data = _subset(cifar, 32, 20)
    recipe = get_recipe("quick", epochs=1, batch_size=32)
    fit(_tiny_model(data), data, recipe, state_dir=tmp_path, seed=7)
    other = get_recipe("quick", epochs=1, batch_size=32, **change.get("recipe", {}))
    with pytest.raises(UserError, match="different run"):
        fit(_tiny_model(data), data, other, state_dir=tmp_path, seed=change.get("seed", 7))


def test_a_diverging_loss_stops_fit_naming_the_epoch_and_saves_nothing(cifar, tmp_path: Path) -> None:
    """A learning rate that passes validation (1e30 is finite) but blows the weights up: fit stops
    at the first non-finite epoch loss, before that epoch's state is saved or reported."""
    data = _subset(cifar, 64, 20)
    reported = []
    with pytest.raises(UserError, match=r"^training diverged in epoch 1 of 2: the loss is nan \(learning rate 1e\+30\)"):
        fit(_tiny_model(data), data, get_recipe("quick", epochs=2, batch_size=32, lr=1e30),
            lambda metrics, state_dir: reported.append(metrics), state_dir=tmp_path, device="cpu")
    assert reported == [] and not (tmp_path / STATE_FILE).exists()


def test_cli_diverging_lr_is_one_line_and_exit_2_without_a_model(cifar_folder: Path, data_dir: Path,
                                                                  tmp_path: Path) -> None:
    out = tmp_path / "run"
    command = _train_command(cifar_folder, data_dir, out)
    command[command.index("--epochs") + 1] = "2"
    proc = subprocess.run([sys.executable, "-m", "rm_sweep.train", *command, "--lr", "1e30"],
                          capture_output=True, text=True, timeout=600)
    (line,) = proc.stderr.splitlines()  # no progress bar: stderr is a pipe here
    assert proc.returncode == 2 and line.startswith("error: training diverged in epoch 1 of 2")
    assert not (out / "model.pt").exists() and not (out / STATE_FILE).exists()


@pytest.mark.parametrize("state", [b"not a torch file", "planted"])
def test_an_unusable_state_is_reported_and_training_starts_over(cifar, tmp_path: Path, state) -> None:
    """Given ``on_unusable_state`` (the sweep's workers), a state that cannot be resumed (corrupt,
    or a pickle that is not weights) is reported, deleted and training starts from epoch 1, with
    the same result as a run that never saw it; nothing in it is executed."""
    marker = tmp_path / "executed"
    if state == "planted":
        torch.save(_Planted(marker), tmp_path / STATE_FILE)
    else:
        (tmp_path / STATE_FILE).write_bytes(state)
    data = _subset(cifar, 64, 20)
    recipe = get_recipe("quick", epochs=1, batch_size=32)
    reasons: list[str] = []
    got = fit(_tiny_model(data), data, recipe, state_dir=tmp_path, device="cpu", on_unusable_state=reasons.append)
    expected = fit(_tiny_model(data), data, recipe, device="cpu")
    assert len(reasons) == 1 and "corrupt" in reasons[0] and not marker.exists()
    assert got["train_loss"] == expected["train_loss"]
    (tmp_path / STATE_FILE).write_bytes(b"garbage")
    with pytest.raises(UserError, match="is corrupt .*; delete it to start over"):  # without the hook: an error
        fit(_tiny_model(data), data, recipe, state_dir=tmp_path, device="cpu")


@pytest.mark.parametrize("damage, problem", [
    (lambda s: s.pop("optimizer"), "its optimizer is missing or not a dict"),
    (lambda s: s.update(epoch="1"), "its epoch is missing or not a int"),
    (lambda s: s.update(history=[]), "its history does not hold epochs 1-1"),
    (lambda s: s.update(history=[{}]), "its history does not hold epochs 1-1"),
    (lambda s: s.update(loader_rng=torch.zeros(3)), "its loader_rng is not a generator state"),
], ids=["no-optimizer", "epoch-text", "no-history", "history-empty", "rng-float"])
def test_a_damaged_state_of_the_same_run_is_reported_before_anything_is_loaded(cifar, tmp_path: Path, damage,
                                                                               problem: str) -> None:
    data = _subset(cifar, 64, 20)
    recipe = get_recipe("quick", epochs=1, batch_size=32)
    expected = fit(_tiny_model(data), data, recipe, state_dir=tmp_path, device="cpu")
    state = torch.load(tmp_path / STATE_FILE, weights_only=True)
    damage(state)
    torch.save(state, tmp_path / STATE_FILE)
    with pytest.raises(UserError, match=f"is damaged \\({problem}\\); delete it to start over"):
        fit(_tiny_model(data), data, recipe, state_dir=tmp_path, device="cpu")
    reasons: list[str] = []
    got = fit(_tiny_model(data), data, recipe, state_dir=tmp_path, device="cpu", on_unusable_state=reasons.append)
    assert len(reasons) == 1 and problem in reasons[0] and got["train_loss"] == expected["train_loss"]


def test_a_state_whose_weights_do_not_fit_stops_the_run_even_with_a_fallback(cifar, tmp_path: Path) -> None:
    """Found only while loading, when the model is partly overwritten: no training from there."""
    data = _subset(cifar, 64, 20)
    recipe = get_recipe("quick", epochs=1, batch_size=32)
    fit(_tiny_model(data), data, recipe, state_dir=tmp_path, device="cpu")
    state = torch.load(tmp_path / STATE_FILE, weights_only=True)
    state["model"] = {k: v[:1] if v.dim() else v for k, v in state["model"].items()}
    torch.save(state, tmp_path / STATE_FILE)
    with pytest.raises(UserError, match="does not fit this run .*; delete it to start over"):
        fit(_tiny_model(data), data, recipe, state_dir=tmp_path, device="cpu", on_unusable_state=print)


class _Planted:
    """Unpickling this creates a file: the proof that something was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _train_command(cifar_folder: Path, data_dir: Path, out: Path) -> list[str]:
    return ["--data", f"folder:{cifar_folder}", "--data-dir", str(data_dir), "--arch", "resnet18",
            "--width", "0.125", "--shallow", "0.5", "--recipe", "quick", "--epochs", "1", "--batch-size", "32",
            "--train-subset", "200", "--test-subset", "100", "--out", str(out), "--device", "cpu"]


def test_cli_writes_a_checkpoint_that_scores_what_it_printed(
        cifar_folder: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    command = _train_command(cifar_folder, data_dir, tmp_path / "run")
    assert main(command) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["epochs"] == 1 and printed["train_seconds"] > 0
    model = load_checkpoint(tmp_path / "run" / "model.pt")
    assert model.config.mask.shallow_ratio == 0.5 and model.config.width == 0.125
    trained = torch.load(tmp_path / "run" / STATE_FILE, weights_only=True)["model"]
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())  # the last epoch's weights
    test = load_dataset(f"folder:{cifar_folder}", data_dir=data_dir, test_subset=100)
    assert evaluate_accuracy(model, test.test_x, test.test_y) == printed["clean_accuracy"]
    assert main(command) == 0  # finished: the rerun resumes at the end and reports the same run
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["clean_accuracy"] == printed["clean_accuracy"]


def test_cli_masks_are_those_of_the_search_space_entry_with_the_same_settings(
        cifar_folder: Path, data_dir: Path, tmp_path: Path) -> None:
    # A training seed other than 0 and no --mask-seed: a space's mask_seed defaults to 0, and so does the CLI's.
    assert main([*_train_command(cifar_folder, data_dir, tmp_path / "run"), "--seed", "1"]) == 0
    spec = ModelSpec(arch="resnet18", data=f"folder:{cifar_folder}", width=0.125, mask=MaskConfig(shallow_ratio=0.5),
                     train_subset=200, test_subset=100, recipe="quick", seed=1)
    data = load_dataset(f"folder:{cifar_folder}", data_dir=data_dir, train_subset=200, test_subset=100)
    reference = spec.create(data).state_dict()
    masks = {k: v for k, v in load_checkpoint(tmp_path / "run" / "model.pt").state_dict().items() if "mask" in k}
    assert masks and all(torch.equal(v, reference[k]) for k, v in masks.items())


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[str, str]]:
    write_image_folder(tmp_path / "no_test", splits=("train",))
    write_image_folder(tmp_path / "no_train", splits=("test",))
    return {
        "unknown data set": ("imagenet", "unknown data set"),
        "missing folder": (f"folder:{tmp_path / 'nowhere'}", "does not exist"),
        "folder without test/": (f"folder:{tmp_path / 'no_test'}", "no test/"),
        "folder without train/": (f"folder:{tmp_path / 'no_train'}", "no train/"),
        "missing download": ("mnist", "mnist not found in .* could not be downloaded"),
    }


@pytest.mark.parametrize("case", ["unknown data set", "missing folder", "folder without test/",
                                  "folder without train/", "missing download"])
def test_cli_bad_data_is_one_line_and_exit_2(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, case: str) -> None:
    def offline(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    spec, message = _bad_inputs(tmp_path)[case]
    argv = ["--data", spec, "--data-dir", str(tmp_path / "dl"), "--arch", "resnet18", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(main, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert re.search(message, err)


@pytest.mark.parametrize("args, message", [
    (["--arch", "alexnet"], "unknown architecture"),
    (["--arch", "resnet18", "--shallow", "1.5"], "shallow_ratio"),
    (["--arch", "resnet18", "--recipe", "slow"], "unknown recipe"),
    (["--arch", "resnet18", "--milestones", "5,x"], "--milestones"),
])
def test_cli_bad_model_or_recipe_fails_before_loading_data(
        tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(main, ["--data", "folder:/nowhere", *args, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err
    assert not (tmp_path / "o").exists()


def test_module_entry_point_reports_errors_in_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "rm_sweep.train", "--data", "imagenet", "--arch", "resnet18",
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr == "error: unknown data set 'imagenet'; use cifar10, mnist or folder:PATH\n"


def _pattern_data(n_train: int, n_test: int) -> Dataset:
    """Ten classes, each a fixed random 32x32 pattern under noise: learnable in a few epochs."""
    gen = torch.Generator().manual_seed(0)
    patterns = torch.rand(10, 3, 32, 32, generator=gen)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % 10
        x = 0.6 * patterns[y] + 0.4 * torch.rand(n, 3, 32, 32, generator=gen)
        return (x * 255).round().to(torch.uint8), y

    (train_x, train_y), (test_x, test_y) = draw(n_train), draw(n_test)
    return Dataset("synthetic", train_x, train_y, test_x, test_y, tuple(map(str, range(10))),
                   (0.5,) * 3, (0.25,) * 3, augment="flip")


_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.slow),
                                    pytest.param("cuda", marks=[pytest.mark.gpu, _CUDA])])
def test_compiled_fit_of_a_masked_model_trains_as_the_eager_one(device: str) -> None:
    """fit(compile=True) (Inductor on the CPU, CUDA graphs on a GPU): same data order, masks and
    recipe, so the compiled run's losses track the eager run's closely. On CUDA this also checks
    that replayed graphs see each step's fresh batch and the optimizer's updated weights."""
    data = _pattern_data(512, 100)
    recipe = get_recipe("quick", epochs=2, batch_size=64, milestones=[])
    runs = {c: fit(_tiny_model(data, shallow=0.7), data, recipe, device=device, compile=c) for c in (False, True)}
    assert runs[True]["train_accuracy"] > 0.9  # from 0.1 at the start: the compiled run learns
    assert runs[True]["train_loss"] == pytest.approx(runs[False]["train_loss"], rel=0.05)


@pytest.mark.parametrize("device, compile, compiled", [
    ("cpu", None, False), ("cpu", True, True),
    pytest.param("cuda", None, True, marks=[pytest.mark.gpu, _CUDA]),
    pytest.param("cuda", False, False, marks=[pytest.mark.gpu, _CUDA]),
])
def test_fit_compiles_by_default_on_cuda_only(monkeypatch: pytest.MonkeyPatch, device: str, compile: bool | None,
                                              compiled: bool) -> None:
    calls = []
    monkeypatch.setattr("rm_sweep.train.compile_for_training", lambda model, dev: calls.append(dev) or model)
    data = _pattern_data(64, 10)
    fit(_tiny_model(data), data, get_recipe("quick", epochs=1, batch_size=32), device=device, compile=compile)
    assert calls == ([torch.device(device)] if compiled else [])


@pytest.mark.gpu
@_CUDA
@pytest.mark.parametrize("arch", list_models())
def test_every_masked_architecture_trains_with_cuda_graphs(arch: str) -> None:
    """fit's default on CUDA (CUDA graphs) for every family: compiles, replays and learns."""
    data = _pattern_data(1024, 100)
    torch.manual_seed(0)
    model = create_model(arch, width=0.125, mask=MaskConfig(shallow_ratio=0.5, deep_ratio=0.3, seed=1),
                         mean=data.mean, std=data.std)
    done = fit(model, data, get_recipe("quick", epochs=3, batch_size=128, milestones=[]), device="cuda")
    # Measured on the replayed graphs' own outputs; eager CPU runs of this setting reach 0.93-1.0.
    # (Test accuracy is not asserted: 24 steps leave BatchNorm's running statistics behind.)
    assert done["train_accuracy"] > 0.5  # chance is 0.1


@pytest.mark.gpu
@_CUDA
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_fit_with_bf16_channels_last_and_compile_learns_and_resumes(tmp_path: Path, compile: bool) -> None:
    data = _pattern_data(2048, 500)
    recipe = get_recipe("quick", epochs=3, batch_size=128, milestones=[2])
    done = fit(_tiny_model(data), data, recipe, state_dir=tmp_path, device="cuda", compile=compile)
    assert done["clean_accuracy"] > 0.9 and done["device"] == torch.cuda.get_device_name()
    again = fit(_tiny_model(data, seed=5), data, recipe, state_dir=tmp_path, device="cuda", compile=compile)
    assert again == done  # a finished state resumes at its end: nothing is trained twice


@pytest.mark.gpu
@_CUDA
def test_cuda_loader_serves_the_same_batches_as_the_cpu_loader() -> None:
    data = _pattern_data(300, 10)
    batches = {}
    for device in ("cpu", "cuda"):
        loader = DeviceLoader(data.train_x, data.train_y, 64, device=device, augment="crop-flip", shuffle=True,
                              generator=torch.Generator().manual_seed(1), channels_last=True)
        # Back to 0..255: CUDA may divide by 255 as a multiplication, one rounding apart from the CPU.
        batches[device] = [((x * 255).round().cpu(), y.cpu()) for x, y in loader]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches["cpu"], batches["cuda"]))
