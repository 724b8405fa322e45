"""One command for all (``rm-sweep COMMAND``, ``python -m rm_sweep COMMAND``) and what commands share:
the Ray address a command joins. Nothing here starts Ray."""
from __future__ import annotations

import argparse
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import rm_sweep
import rm_sweep.__main__ as entry
from rm_sweep import cli, matrix, pipeline, sweep, tradeoff
from rm_sweep.atomic import atomic_write_bytes
from rm_sweep.errors import UserError, cli_main
from rm_sweep.orchestration.session import unreachable
from rm_sweep.orchestration.values import SweepResult

from imagefolder import write_image_folder
from scaffold import ROOT, closed_port, run_command, tiny_space, write_space

HEAD = "10.0.0.1:6379"  # what ray job submit puts in a job driver's RAY_ADDRESS: the head's GCS


def test_python_m_rm_sweep_help_lists_every_command_in_one_line_each() -> None:
    done = run_command("rm_sweep", "--help", timeout=120)
    assert done.returncode == 0, done.stderr
    for name, (_, line) in entry.COMMANDS.items():
        assert f"  {name}  " in done.stdout and line in done.stdout
    assert "report" in done.stdout and done.stdout.rstrip().endswith("ray not imported")


@pytest.mark.parametrize("argv, status", [(["--help"], 0), (["--version"], 0), ([], 2), (["trian"], 2)])
def test_rm_sweep_lists_or_refuses_commands_without_importing_torch(argv: list[str], status: int) -> None:
    # The first thing a new user types answers at once: torch alone takes seconds to import.
    done = run_command("rm_sweep", *argv, timeout=120, watch=("torch", "pandas"))
    assert done.returncode == status, done.stderr
    if argv == ["--version"]:
        assert done.stdout.splitlines()[0] == f"rm-sweep {rm_sweep.__version__}"
    assert done.stdout.splitlines()[-2:] == ["torch not imported", "pandas not imported"], done.stdout


def test_console_script_entry_prints_the_same_help(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(sys, "argv", ["rm-sweep", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        entry.run()
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and out.startswith("usage: rm-sweep")
    assert all(name in out for name in ("train", "sweep", "matrix", "tradeoff", "query", "report"))


def test_a_command_runs_its_module_with_the_remaining_arguments(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    assert entry.main(["query", "--store", str(tmp_path), "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "table,rows,columns"  # query's listing, as CSV
    with pytest.raises(SystemExit) as exit_info:
        entry.main(["sweep", "--help"])  # the command's own help, not rm-sweep's
    assert exit_info.value.code == 0 and "--gpus-per-trial" in capsys.readouterr().out


def test_python_m_form_routes_and_imports_no_ray(tmp_path: Path) -> None:
    done = run_command("rm_sweep", "query", "--store", str(tmp_path / "nowhere"), timeout=120)
    assert done.returncode == 2 and done.stderr.strip() == f"error: no store at {tmp_path / 'nowhere'} " \
                                                           "(run python -m rm_sweep.tradeoff or rm_sweep.sweep first)"
    assert done.stdout.strip() == "ray not imported"


@pytest.mark.parametrize("argv, message", [
    ([], "name a command: train, sweep, matrix, tradeoff, query, report"),
    (["quer"], "unknown command 'quer'; did you mean query?"),
])
def test_a_missing_or_unknown_command_is_one_line(capsys: pytest.CaptureFixture, argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(entry.main, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err


@pytest.mark.parametrize("env, argv, expected", [
    (None, [], None),                              # a private local instance
    ("", [], None),                                # set but empty: as unset (ray.init reads it so too)
    (HEAD, [], HEAD),                              # inside a job from ray job submit
    (HEAD, ["--address", "auto"], "auto"),         # the flag wins
    ("local", [], None),                           # Ray's word for "start one here"
    (None, ["--address", "local"], None),
    (None, ["--address", "ray://head:10001"], "ray://head:10001"),
])
def test_address_defaults_to_ray_address(monkeypatch: pytest.MonkeyPatch, env: str | None, argv: list[str],
                                         expected: str | None) -> None:
    if env is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", env)
    parser = cli.parser("test", "")
    cli.add_cluster(parser)
    assert parser.parse_args(argv).address == expected
    assert "$RAY_ADDRESS" in parser.format_help()


def test_every_pipeline_command_joins_ray_address(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", HEAD)
    space = write_space(tmp_path / "one.yaml", {"name": "one", "data": f"folder:{tmp_path}", "models": [
        {"name": "normal", "arch": "resnet18", "width": 0.125}]})
    for command in (sweep, matrix, tradeoff):
        argv = ["--space", str(space)] if command is tradeoff else [str(space)]
        assert command._parse_args(argv).address == HEAD
    calls = []

    def fake_train(space, store, **kwargs):
        calls.append(kwargs["address"])
        return SweepResult()

    monkeypatch.setattr(pipeline, "train", fake_train)
    sweep.main([str(space), "--store", str(tmp_path / "store"), "--quiet"])
    assert calls == [HEAD]



def test_a_ray_address_where_nothing_answers_is_one_line_not_a_hang(tmp_path: Path) -> None:
    """``ray.init`` waits without end for a GCS that does not answer: a sweep given a closed port
    must say so in one line (and leave no store behind) instead."""
    address = f"127.0.0.1:{closed_port()}"
    space = write_space(tmp_path / "one.yaml", tiny_space("one", str(tmp_path / "data"), [{"name": "a"}], []))
    write_image_folder(tmp_path / "data", classes=3, train=4, test=2)
    done = run_command("rm_sweep.sweep", str(space), "--store", str(tmp_path / "store"), "--address", address,
                       env={"RM_SWEEP_DATA_DIR": str(tmp_path / "cache")}, timeout=120)
    assert done.returncode == 2 and done.stderr.splitlines() == [
        f"error: cannot connect to the Ray cluster at {address}: nothing answers there (Connection refused)"]
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("address", ["auto", "anyscale://head:10001", "head", "head:port", "ray://head"])
def test_addresses_ray_checks_itself_are_not_probed(address: str) -> None:
    assert unreachable(address) is None


@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_a_listening_port_is_reachable_and_a_closed_one_is_not(scheme: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        assert unreachable(f"{scheme}127.0.0.1:{server.getsockname()[1]}") is None
    assert unreachable(f"{scheme}127.0.0.1:{closed_port()}") == "Connection refused"


PATH_CHECKS = {"output_file": lambda text: cli.output_file(text, make_parent=True),
               "output_dir": lambda text: cli.output_dir(text, "a run"),
               "mlflow_uri": cli.mlflow_uri}


@pytest.mark.parametrize("check", PATH_CHECKS.values(), ids=PATH_CHECKS.keys())
def test_a_path_below_a_file_is_refused_naming_that_file(tmp_path: Path, check) -> None:
    (tmp_path / "afile").write_text("")
    with pytest.raises((UserError, argparse.ArgumentTypeError), match=f"{tmp_path / 'afile'} is not a directory"):
        check(str(tmp_path / "afile" / "deeper" / "x"))


@pytest.mark.parametrize("check", ["output_file", "output_dir"])
def test_a_path_to_create_deep_below_a_writable_folder_passes_and_checking_creates_nothing(tmp_path: Path,
                                                                                         check: str) -> None:
    target = tmp_path / "a" / "b" / "out"
    assert PATH_CHECKS[check](str(target)) == target
    assert list(tmp_path.iterdir()) == []


def test_out_to_a_pipe_or_a_link_writes_through_and_replaces_neither(tmp_path: Path) -> None:
    """``--out /dev/stdout`` or a link: a pipe or device is written to, never replaced by a file
    (as root that would replace /dev/null itself); a link keeps its place and its file gets the data."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader waiting, as a shell's would be
    try:
        assert cli.output_file(str(fifo)) == fifo
        atomic_write_bytes(fifo, b"rows\n")
        assert os.read(reader, 100) == b"rows\n"
    finally:
        os.close(reader)
    assert stat.S_ISFIFO(fifo.stat().st_mode) and sorted(p.name for p in tmp_path.iterdir()) == ["fifo"]
    target = tmp_path / "table.csv"
    target.write_text("old\n")
    (tmp_path / "link.csv").symlink_to(target)
    atomic_write_bytes(tmp_path / "link.csv", b"new\n")
    assert (tmp_path / "link.csv").is_symlink() and target.read_text() == "new\n"


@pytest.mark.skipif(not Path("/dev/full").is_char_device(), reason="no /dev/full")
def test_a_device_that_refuses_the_data_is_one_line_and_stays_a_device() -> None:
    with pytest.raises(UserError, match="^cannot write /dev/full: No space left on device$"):
        atomic_write_bytes("/dev/full", b"rows\n")
    assert Path("/dev/full").is_char_device()


def test_output_cut_short_by_its_reader_ends_quietly(tmp_path: Path) -> None:
    """``rm-sweep query ... | head``: when the reader has gone, the command stops without a traceback."""
    (tmp_path / "store").mkdir()
    reader, writer = os.pipe()
    os.close(reader)  # gone before the first line: the first write fails, whatever the timing
    try:
        done = subprocess.run([sys.executable, "-m", "rm_sweep.query", "--store", str(tmp_path / "store"), "--format",
                               "csv", "--sql", "SELECT range AS n FROM range(3000)"], cwd=ROOT, stdout=writer,
                              stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    finally:
        os.close(writer)
    assert done.returncode == 141 and done.stderr == b""
