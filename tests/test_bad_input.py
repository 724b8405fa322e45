"""Bad input to every command: exit status 2, exactly one line on stderr (``error: ...``), Ray never
imported (so never started), and no store created or changed.

Every case runs as a user runs it (``python -m rm_sweep.<command>``, tests/scaffold.py
``probe_command``), several at a time: each is mostly Python start-up. Cases that need file
permissions to apply run without the capabilities that let root ignore them (``setpriv``).
"""
from __future__ import annotations

import hashlib
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rm_sweep.__main__ import COMMANDS
from rm_sweep.store import Store

from imagefolder import write_image_folder
from scaffold import DUMMY_AWS, closed_port, probe_command, tiny_space, without_file_override, write_space
from tinystore import add_models, matrix_rows

UNREACHABLE = f"s3://bucket/prefix?endpoint_override=127.0.0.1:{closed_port()}&scheme=http"
TRAIN = ["--data", "folder:data", "--arch", "resnet18", "--width", "0.125", "--recipe", "quick", "--epochs", "1",
         "--out", "run"]


def _train(*changes: str, drop: str | None = None) -> list[str]:
    """The training flags with ``changes`` (flag, value pairs) replacing or adding, ``drop`` removed."""
    args = list(TRAIN)
    for flag, value in zip(changes[::2], changes[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    if drop:
        i = args.index(drop)
        del args[i:i + 2]
    return args


# (id, command, arguments, what stderr's one line must contain); names refer to the files of ``world``.
CASES = [
    # python -m rm_sweep.train
    ("train-device", "train", _train("--device", "tpu9"), "unknown device 'tpu9'; use cpu, cuda or cuda:N"),
    ("train-device-type", "train", _train("--device", "meta"), "unknown device type 'meta'"),
    ("train-out-file", "train", _train("--out", "afile"), "--out afile is a file"),
    ("train-arch", "train", _train("--arch", "resnet181"), "did you mean resnet18?"),
    ("train-vgg-64", "train", _train("--arch", "vgg19", "--data", "folder:big"),
     "vgg19 at width 0.125 cannot take 64x64 images"),
    ("train-width-0", "train", _train("--width", "0"), "argument --width: value must be a positive number"),
    ("train-width-inf", "train", _train("--width", "inf"), "value must be a finite number, got inf"),
    ("train-lr-inf", "train", _train("--lr", "inf"), "argument --lr: value must be a finite number"),
    ("train-lr-negative", "train", _train("--lr", "-0.1"), "argument --lr: value must be a positive number"),
    ("train-seed-1e23", "train", _train("--seed", "1e23"), "argument --seed: an integer is needed, got '1e23'"),
    ("train-seed-negative", "train", _train("--seed", "-1"), "argument --seed: value must be an integer in [0, 2**63)"),
    ("train-epochs-0", "train", _train("--epochs", "0"), "argument --epochs: value must be a positive integer"),
    ("train-milestones", "train", _train("--milestones", "a,b"), "--milestones must be comma-separated epochs"),
    ("train-no-folder", "train", _train("--data", "folder:nowhere"), "data folder nowhere does not exist"),
    ("train-data-kind", "train", _train("--data", "imagenet"), "unknown data set"),
    ("train-no-test-split", "train", _train("--data", "folder:trainonly"), "has no test/ subfolder"),
    ("train-recipe", "train", _train("--recipe", "fastest"), "unknown recipe 'fastest'"),
    ("train-shallow", "train", _train("--shallow", "1.5"), "1.5 is outside [0, 1)"),
    ("train-variant", "train", _train("--variant", "rand"), "unknown mask variant 'rand'"),
    ("train-batch-1", "train", _train("--batch-size", "1"), "BatchNorm needs 2 images"),
    ("train-width-huge", "train", _train("--width", "1e9"), "resnet18 at width 1e+09 is too large to build"),
    ("train-lr-past-float32", "train", _train("--lr", "1e300"), "lr must be a number <= 3.403e+38"),
    ("train-subset", "train", _train("--train-subset", "2"), "train_subset must be an integer of at least 3"),
    ("train-threads", "train", _train("--threads", "100000"), "argument --threads: value must be a number <= 1024"),
    ("train-no-out", "train", _train(drop="--out"), "the following arguments are required: --out"),
    ("train-model-dir", "train", _train("--out", "clashrun"), "clashrun/model.pt, written with it, is a directory"),
    ("train-out-read-only", "train", _train("--out", "readonly/run"),
     "--out readonly/run: cannot write in readonly (Permission denied)"),
    ("train-data-dir-read-only", "train", _train("--data-dir", "readonly/cache"),
     "data dir readonly/cache: cannot save the decoded data set: cannot write in readonly (Permission denied)"),
    # python -m rm_sweep.sweep
    ("sweep-no-space", "sweep", ["nowhere.yaml"], "nowhere.yaml: cannot read the search space"),
    ("sweep-yaml", "sweep", ["broken.yaml"], "broken.yaml: not valid YAML"),
    ("sweep-seed-1e23", "sweep", ["seed.yaml"], "models[0].seed: '1.0e23' is text, not a number"),
    ("sweep-width-inf", "sweep", ["width.yaml"], "models[0].width must be a finite number, got inf"),
    ("sweep-lr-inf", "sweep", ["lr.yaml"], "recipe.lr must be a finite number, got inf"),
    ("sweep-ensemble-huge", "sweep", ["huge.yaml", "--dry-run"], "models[1].ensemble.size must be a number <= 1000"),
    ("sweep-key-list", "sweep", ["listkey.yaml"], "a list or a mapping cannot be a key"),
    ("sweep-attack-list", "sweep", ["nested.yaml"], "matrix[0].attacks[0]: unknown attack setting ['madry_fgsm']"),
    ("sweep-limit-int64", "sweep", ["limit.yaml", "--dry-run"], "matrix[0].limit must be a number <= 9.223e+18"),
    ("sweep-data-user", "sweep", ["space.yaml", "--dry-run", "--data", "folder:~nosuchuser/x"],
     "data spec 'folder:~nosuchuser/x': Could not determine home directory"),
    ("sweep-store-file", "sweep", ["space.yaml", "--store", "afile"], "store afile is a file"),
    ("sweep-store-file-dry", "sweep", ["space.yaml", "--store", "afile", "--dry-run"], "store afile is a file"),
    ("sweep-s3-dry", "sweep", ["space.yaml", "--store", UNREACHABLE, "--dry-run"], "cannot reach the endpoint 127.0.0.1:"),
    ("sweep-read-only", "sweep", ["space.yaml", "--store", "readonly"], "store readonly: cannot write in readonly (Permission denied)"),
    ("sweep-no-folder", "sweep", ["space.yaml", "--store", "new", "--data", "folder:nowhere"],
     "data folder nowhere does not exist"),
    ("sweep-data-dir-read-only", "sweep", ["space.yaml", "--store", "new", "--data-dir", "readonly/cache"],
     "data dir readonly/cache: cannot save the decoded data set: cannot write in readonly (Permission denied)"),
    ("sweep-mlflow-read-only", "sweep", ["space.yaml", "--mlflow", "file:readonly/mlruns"],
     "argument --mlflow: file:readonly/mlruns: cannot write in readonly (Permission denied)"),
    ("sweep-gpus", "sweep", ["space.yaml", "--gpus-per-trial", "-1"], "argument --gpus-per-trial"),
    ("sweep-cpus", "sweep", ["space.yaml", "--cpus-per-trial", "0"], "argument --cpus-per-trial"),
    ("sweep-num-cpus", "sweep", ["space.yaml", "--num-cpus", "0"], "argument --num-cpus"),
    ("sweep-flag", "sweep", ["space.yaml", "--resume"], "unrecognized arguments: --resume"),
    # python -m rm_sweep.matrix
    ("matrix-no-space", "matrix", ["nowhere.yaml"], "nowhere.yaml: cannot read the search space"),
    ("matrix-attack", "matrix", ["attack.yaml"], "matrix[0].attacks[0]: unknown attack setting 'pgd8'"),
    ("matrix-batch", "matrix", ["space.yaml", "--batch-size", "0"], "argument --batch-size"),
    ("matrix-actors", "matrix", ["space.yaml", "--actors", "0"], "argument --actors"),
    ("matrix-gpus", "matrix", ["space.yaml", "--gpus-per-craft", "2"], "gpus per craft must be a share of one GPU"),
    ("matrix-store-file", "matrix", ["space.yaml", "--store", "afile"], "store afile is a file"),
    ("matrix-read-only", "matrix", ["space.yaml", "--store", "readonly"], "store readonly: cannot write in readonly (Permission denied)"),
    ("matrix-no-folder", "matrix", ["space.yaml", "--store", "new", "--data", "folder:nowhere"],
     "data folder nowhere does not exist"),
    ("matrix-s3", "matrix", ["space.yaml", "--store", UNREACHABLE], "cannot reach the endpoint 127.0.0.1:"),
    # python -m rm_sweep.tradeoff
    ("tradeoff-out-dir", "tradeoff", ["--space", "space.yaml", "--out", "adir.png"], "--out adir.png is a directory"),
    ("tradeoff-out-jpg", "tradeoff", ["--space", "space.yaml", "--out", "fig.jpg"], "must be a .png file"),
    ("tradeoff-out-hidden", "tradeoff", ["--space", "space.yaml", "--out", "figs/.png"],
     "the figure needs a name before .png, got figs/.png"),
    ("tradeoff-out-under-file", "tradeoff", ["--space", "space.yaml", "--out", "afile/fig.png"],
     "afile is not a directory"),
    ("tradeoff-out-read-only", "tradeoff", ["--space", "space.yaml", "--out", "readonly/fig.png"],
     "--out readonly/fig.png: cannot write in readonly (Permission denied)"),
    ("tradeoff-svg-dir", "tradeoff", ["--space", "space.yaml", "--out", "clash.png"],
     "clash.svg, written with it, is a directory"),
    ("tradeoff-no-cells", "tradeoff", ["--space", "nofig.yaml"], "no Fig. 14 cells"),
    ("tradeoff-store-file", "tradeoff", ["--space", "space.yaml", "--store", "afile"], "store afile is a file"),
    ("tradeoff-paper", "tradeoff", ["--paper", "maybe"], "argument --paper: invalid choice"),
    # python -m rm_sweep.query
    ("query-store-file", "query", ["--store", "afile"], "store afile is a file"),
    ("query-no-store", "query", ["--store", "nowhere"], "no store at nowhere"),
    ("query-pivot-time", "query", ["pivot", "--setting", "madry_pgd", "--value", "created_at"],
     "--value 'created_at' is not a number column"),
    ("query-pivot-setting", "query", ["pivot"], "pivot needs --setting"),
    ("query-out-dir", "query", ["models", "--out", "adir"], "--out adir is a directory"),
    ("query-out-missing", "query", ["models", "--out", "missing/models.csv"], "missing does not exist"),
    ("query-out-read-only", "query", ["models", "--out", "readonly/models.csv"],
     "--out readonly/models.csv: cannot write in readonly (Permission denied)"),
    ("query-where", "query", ["models", "--where", "seed=abc"], "column is numeric"),
    ("query-where-inf", "query", ["models", "--where", "width=inf"], "inf is not a finite number"),
    ("query-out-full", "query", ["models", "--out", "/dev/full"], "cannot write /dev/full: No space left on device"),
    ("query-no-bucket", "query", ["--store", "s3://"], "name a bucket"),
    ("query-columns", "query", ["models", "--columns", "nope"], "no column 'nope' in models"),
    ("query-sql-table", "query", ["models", "--sql", "SELECT 1"], "--sql takes no table"),
    ("query-sql-empty", "query", ["--sql", " "], "--sql needs a query"),
    ("query-sql-union", "query", ["--sql", "SELECT union_value(k := 1) AS u"], "SQL: the result cannot be shown"),
    ("query-parquet-twice", "query", ["--sql", "SELECT 1 AS a, 2 AS a", "--format", "parquet", "--out", "a.parquet"],
     "cannot write Parquet: Duplicate column names"),
    ("query-foreign", "query", ["models", "--store", "foreign"], "is not a models file: its column seed is double"),
    ("query-s3", "query", ["--store", UNREACHABLE], "cannot reach the endpoint 127.0.0.1:"),
    # python -m rm_sweep.report
    ("report-store-file", "report", ["--store", "afile"], "store afile is a file"),
    ("report-no-store", "report", ["--store", "nowhere"], "no store at nowhere"),
    ("report-s3", "report", ["--store", UNREACHABLE], "cannot reach the endpoint 127.0.0.1:"),
    ("report-foreign", "report", ["--store", "foreign"], "is not a models file: its column seed is double"),
    ("report-out-dir", "report", ["--out", "adir"], "--out adir is a directory"),
    ("report-out-pdf", "report", ["--out", "report.pdf"], "--out must name an .html file"),
    ("report-out-read-only", "report", ["--out", "readonly/report.html"],
     "--out readonly/report.html: cannot write in readonly (Permission denied)"),
    ("report-out-under-file", "report", ["--out", "afile/report.html"], "afile is not a directory"),
    ("report-md-dir", "report", ["--out", "clash.html"], "clash.md, written with it, is a directory"),
    ("report-figures-file", "report", ["--out", "afile.html"], "afile_figures, written with it, is a file"),
    ("report-data", "report", ["--data", "imagenet"], "unknown data set"),
    # found after the figures are drawn: none of them may be left behind
    ("report-data-other", "report", ["--data", "folder:trainonly"], "is not a data set the store's models were"),
    ("report-images", "report", ["--images", "0"], "argument --images: value must be a positive integer"),
]
READ_ONLY = {name for name, *_ in CASES if "read-only" in name}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working directory: a data folder, a good space and bad ones, a store with models and matrix
    cells (``store``, the default), a read-only copy, one with a foreign file, a plain file and a
    directory named like outputs."""
    root = tmp_path_factory.mktemp("bad-input")
    write_image_folder(root / "data", classes=3, train=4, test=2)
    write_image_folder(root / "trainonly", splits=("train",))
    write_image_folder(root / "big", classes=2, train=2, test=1, size=64)
    space = tiny_space("bad", "data", [{"name": "a"}, {"name": "b", "shallow_ratio": 0.5}],
                       [{"sources": ["a"], "targets": ["b"], "attacks": ["madry_fgsm"], "protocols": ["black"]}])
    good = write_space(root / "space.yaml", space).read_text()
    write_space(root / "broken.yaml", "models: [\n  - name: a\n   bad")
    write_space(root / "seed.yaml", good.replace("name: a\n", "name: a\n  seed: 1.0e23\n", 1))
    write_space(root / "width.yaml", good.replace("width: 0.125", "width: .inf", 1))
    write_space(root / "lr.yaml", good.replace("batch_size: 32", "batch_size: 32\n  lr: .inf"))
    write_space(root / "attack.yaml", good.replace("madry_fgsm", "pgd8"))
    write_space(root / "nofig.yaml", good.replace("madry_fgsm", "fgsm16"))
    write_space(root / "listkey.yaml", good.replace("name: bad\n", "name: bad\n? [a, b]\n: 1\n", 1))
    write_space(root / "huge.yaml", good.replace("  name: b\n", "  name: b\n  ensemble: 10000000\n", 1))
    write_space(root / "nested.yaml", good.replace("  - madry_fgsm", "  - [madry_fgsm]"))
    write_space(root / "limit.yaml", good.replace("  protocols:", "  limit: 1.0e+30\n  protocols:"))
    store = Store(root / "store")
    (first, _), _ = add_models(store, 2)
    store.add_matrix(matrix_rows(first.model_id, ["t1", "t2"]))
    shutil.copytree(root / "store", root / "readonly")
    for path in (root / "readonly").rglob("*"):
        path.chmod(0o555 if path.is_dir() else 0o444)
    (root / "readonly").chmod(0o555)
    shutil.copytree(root / "store", root / "foreign")
    row = {f.name: pa.array([None], f.type) for f in pq.read_schema(next((root / "store" / "models").iterdir()))}
    pq.write_table(pa.table({**row, "model_id": pa.array(["f" * 16]), "seed": pa.array([1.0])}),
                   root / "foreign" / "models" / "x.parquet")
    (root / "afile").write_text("not a directory\n")
    (root / "adir").mkdir()
    (root / "adir.png").mkdir()
    for clash in ("clashrun/model.pt", "clash.svg", "clash.md"):  # where a command writes a file beside --out
        (root / clash).mkdir(parents=True)
    (root / "afile_figures").write_text("not a directory\n")
    return root


def _tree(root: Path) -> dict[str, str]:
    """Every path under ``root`` except the data cache, with a digest of each file's content and mode."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else
            f"{p.stat().st_mode:o}:{hashlib.sha256(p.read_bytes()).hexdigest()}"
            for p in sorted(root.rglob("*")) if p.relative_to(root).parts[0] != "cache"}


def _run(world: Path, case: tuple) -> tuple[int, str, str]:
    name, command, args, _ = case
    proc = probe_command(f"rm_sweep.{command}", *args, cwd=world,
                         env={"RM_SWEEP_DATA_DIR": str(world / "cache"), **DUMMY_AWS},
                         wrap=without_file_override if name in READ_ONLY else None)
    stdout, stderr = proc.communicate(timeout=600)
    return proc.returncode, stdout, stderr


def test_the_table_covers_every_command() -> None:
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)
    assert {c[1] for c in CASES} == set(COMMANDS)  # a new command comes with its bad input


def test_bad_input_exits_2_with_one_line_and_changes_no_store(world: Path) -> None:
    before = _tree(world)
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("as root, needs setpriv to run without overriding file permissions")
    with ThreadPoolExecutor(6) as pool:  # mostly CPU-bound start-up; the S3 cases wait on retries
        results = dict(zip([c[0] for c in CASES], pool.map(lambda case: _run(world, case), CASES)))
    wrong = []
    for name, _, _, expected in CASES:
        code, stdout, stderr = results[name]
        lines = stderr.splitlines()
        if code != 2 or len(lines) != 1 or not lines[0].startswith("error: ") or expected not in lines[0] \
                or not stdout.rstrip().endswith("ray not imported"):
            wrong.append((name, code, stderr[-600:], stdout[-200:]))
    assert not wrong, "\n".join(map(str, wrong))
    assert _tree(world) == before  # no store created (no "new", no "run") and none changed


def test_good_input_to_the_same_world_works(world: Path) -> None:
    """The control: the cases fail for the reason they name, not because the world is broken."""
    for command, args, expected in [("sweep", ["space.yaml", "--dry-run"], "bad: 0 of 2 models in store"),
                                    ("query", ["models", "--format", "csv"], "model_id,"),
                                    ("query", ["pivot", "--setting", "madry_pgd", "--ids"], "target"),
                                    ("report", ["--out", str(world.parent / "report" / "r.html")], "1 heatmap(s)")]:
        proc = probe_command(f"rm_sweep.{command}", *args, cwd=world, env={"RM_SWEEP_DATA_DIR": str(world / "cache")})
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0 and expected in stdout and stdout.rstrip().endswith("ray not imported"), stderr
