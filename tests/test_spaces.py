"""Search spaces: every shipped file validates, grids expand as documented, bad files name the field."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from rm_sweep.attacks import SETTINGS
from rm_sweep.errors import UserError
from rm_sweep.protocols import PROTOCOLS
from rm_sweep.spaces import load_space, packaged_spaces, parse_space
from rm_sweep.store import Store

from scaffold import ROOT, probe_command, write_space

SPACES = sorted((ROOT / "search_spaces").glob("*.yaml"))
PAPER_FIG14_RATIOS = [0.3, 0.5, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]


def space(**top) -> dict:
    """A valid space as a mapping, with fields replaced by ``top``."""
    base = {"data": "cifar10", "recipe": {"name": "quick", "epochs": 1},
            "models": [{"name": "source", "arch": "resnet18", "width": 0.125},
                       {"name": "masked", "arch": "resnet18", "width": 0.125, "shallow_ratio": [0.5, 0.9], "seed": 1}],
            "matrix": [{"sources": ["source"], "targets": "all", "attacks": ["madry_pgd"], "protocols": ["black"]}]}
    return {**base, **top}


def test_the_shipped_spaces_are_the_documented_set():
    assert {p.stem for p in SPACES} >= {"fig14", "table2", "table4", "graybox", "mnist", "quick"}


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.stem)
def test_every_shipped_space_validates(path):
    s = load_space(path)
    assert s.name == path.stem and s.models() and s.cells
    ids = {m.model_id for m in s.models()} | {e.ensemble_id for e in s.ensembles()}
    for cell in s.cells:
        assert cell.target_id in ids and (cell.source_id is None or cell.source_id in ids)
        assert cell.attack in SETTINGS or cell.attack == cell.protocol


def test_spaces_ship_in_the_package_and_the_checkout_links_them():
    assert (ROOT / "search_spaces").is_symlink()
    assert (ROOT / "search_spaces").resolve() == (ROOT / "rm_sweep" / "search_spaces").resolve()
    assert packaged_spaces() == sorted(p.stem for p in SPACES)


def test_a_bare_name_loads_the_packaged_space_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    packaged = load_space("quick", data="folder:/anywhere/cifar10-jpeg")
    assert packaged.path == str(ROOT / "rm_sweep" / "search_spaces" / "quick.yaml")
    by_path = load_space(ROOT / "search_spaces" / "quick.yaml", data="folder:/anywhere/cifar10-jpeg")
    assert [m.model_id for m in packaged.models()] == [m.model_id for m in by_path.models()]
    write_space(tmp_path / "quick", space(name="mine"))  # a file of that name, here, comes first
    assert load_space("quick").name == "mine"


@pytest.mark.parametrize("name", ["nope", "nope.yaml", "spaces/quick"])
def test_a_missing_space_lists_the_packaged_ones(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as info:
        load_space(name)
    assert str(info.value) == (f"{name}: cannot read the search space (No such file or directory); "
                               "packaged spaces: fig14, fig14_gpu, graybox, mnist, query_attacks, quick, table2, table4")


def test_fig14_is_the_papers_figure():
    s = load_space(ROOT / "search_spaces/fig14.yaml")
    assert sorted(m.mask.shallow_ratio for m in s.group("shallow").models) == PAPER_FIG14_RATIOS
    assert all(m.recipe == "paper" and m.train_subset is None and m.width == 1 for m in s.models())
    (source,) = s.group("source").models
    assert {c.source_id for c in s.cells} == {source.model_id} and {c.attack for c in s.cells} == {"madry_fgsm", "madry_pgd"}


def test_table2_has_every_placement_variant_multiplier_and_five_mask_ensembles():
    s = load_space(ROOT / "search_spaces/table2.yaml")
    masks = [m.mask for m in s.models()]
    assert {m.variant for m in masks} == {"random", "same", "channel"}
    assert any(m.deep_ratio > 0 and m.shallow_ratio == 0 for m in masks)
    assert any(m.deep_ratio > 0 and m.shallow_ratio > 0 for m in masks)
    assert any(m.channel_multiplier == 2 for m in masks)
    assert len(s.group("ensembles").ensembles) == 2  # one per drop ratio, 0.5 and 0.9
    for ens in s.group("ensembles").ensembles:  # the paper's EN: five masks, five separate trainings
        assert sorted(m.mask.seed for m in ens.members) == [0, 1, 2, 3, 4]
        assert sorted(m.seed for m in ens.members) == [1, 2, 3, 4, 5]
    assert {c.target_kind for c in s.cells} == {"model", "ensemble"}


def test_quick_is_a_small_fig14():
    s = load_space(ROOT / "search_spaces/quick.yaml")
    assert len(s.models()) <= 6 and all(m.width <= 0.25 and m.train_subset <= 5000 for m in s.models())
    assert 0.9 in {m.mask.shallow_ratio for m in s.models()}
    assert s.resources.gpus_per_trial == 0


def test_grids_are_cartesian_products():
    s = parse_space(space(models=[{"name": "g", "arch": ["resnet18", "vgg19"], "shallow_ratio": [0.3, 0.5, 0.7],
                                   "seed": [0, 1]}], matrix=[]))
    models = s.group("g").models
    assert len(models) == 2 * 3 * 2
    assert {(m.arch, m.mask.shallow_ratio, m.seed) for m in models} == {
        (a, r, seed) for a in ("resnet18", "vgg19") for r in (0.3, 0.5, 0.7) for seed in (0, 1)}


def test_points_that_are_the_same_model_are_trained_once():
    # Without a mask, variant and mask seed change nothing: 2 x 2 points, 1 + 2 models.
    s = parse_space(space(models=[{"name": "g", "arch": "resnet18", "shallow_ratio": [0, 0.5], "variant": ["random", "same"]},
                                  {"name": "h", "arch": "resnet18"}], matrix=[]))
    assert len(s.group("g").models) == 3 and len(s.models()) == 3


def test_ensemble_groups_are_five_separately_trained_models_sharing_member_0_with_plain_groups():
    s = parse_space(space(models=[{"name": "single", "arch": "resnet18", "shallow_ratio": 0.5, "seed": 1},
                                  {"name": "en", "arch": "resnet18", "shallow_ratio": 0.5, "seed": 1, "ensemble": 5},
                                  {"name": "normal", "arch": "resnet18"}],
                          matrix=[{"sources": ["single", "normal"], "targets": ["en"], "attacks": ["madry_fgsm"],
                                   "protocols": ["black"]}]))
    (ens,) = s.ensembles()
    assert [(m.seed, m.mask.seed) for m in ens.members] == [(1, 0), (2, 1), (3, 2), (4, 3), (5, 4)]
    assert len(s.models()) == 6  # member 0 is the single model
    # The single model is member 0 of the ensemble: no black-box cell from it, one from normal.
    (cell,) = s.cells
    assert cell.target_id == ens.ensemble_id and cell.target_kind == "ensemble"
    assert cell.source_id == s.group("normal").models[0].model_id


@pytest.mark.parametrize("ensemble, seeds", [
    (3, [(2, 4), (3, 5), (4, 6)]),
    ({"size": 3}, [(2, 4), (3, 5), (4, 6)]),
    ({"size": 3, "seeds": "independent"}, [(2, 4), (3, 5), (4, 6)]),
    ({"size": 3, "seeds": "shared"}, [(2, 4), (2, 5), (2, 6)]),
])
def test_the_space_says_how_ensemble_members_are_seeded(ensemble, seeds):
    s = parse_space(space(models=[{"name": "en", "arch": "resnet18", "shallow_ratio": 0.5, "seed": 2, "mask_seed": 4,
                                   "ensemble": ensemble}], matrix=[]))
    (ens,) = s.ensembles()
    assert [(m.seed, m.mask.seed) for m in ens.members] == seeds


def test_independent_ensemble_members_differ_in_initial_weights():
    s = parse_space(space(models=[{"name": "en", "arch": "resnet18", "width": 0.125, "shallow_ratio": 0.5,
                                   "ensemble": 2}], matrix=[]))
    data = SimpleNamespace(num_classes=10, in_channels=3, image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    first, second = (m.create(data) for m in s.ensembles()[0].members)
    conv = "body.conv1.weight"
    assert not torch.equal(first.state_dict()[conv], second.state_dict()[conv])
    masks = [k for k in first.state_dict() if k.endswith(".mask")]
    assert masks and not all(torch.equal(first.state_dict()[k], second.state_dict()[k]) for k in masks)


def test_gray_box_other_mask_targets_are_separately_trained():
    s = load_space(ROOT / "search_spaces/graybox.yaml")
    models = {m.model_id: m for m in s.models()}
    gray = [c for c in s.cells if c.protocol == "gray"]
    assert gray and all(models[c.source_id].seed != models[c.target_id].seed for c in gray)
    same_ratio_other_mask = [c for c in gray if models[c.target_id].mask.seed != models[c.source_id].mask.seed
                             and models[c.target_id].mask.shallow_ratio == models[c.source_id].mask.shallow_ratio]
    assert {models[c.source_id].mask.shallow_ratio for c in same_ratio_other_mask} == {0.5, 0.7}


def test_white_box_settings_are_table_6s_small_budgets():
    s = load_space(ROOT / "search_spaces/graybox.yaml")
    white = {(json.loads(c.attack_params)["method"], json.loads(c.attack_params)["eps_255"])
             for c in s.cells if c.protocol == "white"}
    assert white == {(a, e) for a in ("fgsm", "pgd") for e in (1, 2, 4)}


def test_an_ensemble_group_is_a_source_of_its_ensembles_and_never_attacks_its_own_members():
    s = parse_space(space(models=[{"name": "en", "arch": "resnet18", "seed": 10, "ensemble": 3},
                                  {"name": "normal", "arch": "resnet18", "seed": [10, 20]}],
                          matrix=[{"sources": ["en"], "targets": ["normal"], "attacks": ["mifgsm16"],
                                   "protocols": ["black"]}]))
    (ens,) = s.ensembles()
    member = s.group("normal").models[0]  # seed 10: member 0 of the ensemble
    assert member.model_id in ens.member_ids
    (cell,) = s.cells  # the seed-20 model only: attacking a member would be white-box
    assert cell.source_id == ens.ensemble_id and cell.target_id == s.group("normal").models[1].model_id


def test_query_cells_have_no_source_and_the_settings_budget():
    s = parse_space(space(matrix=[{"targets": ["masked"], "attacks": ["square8_quick", "hsj8_quick"],
                                   "protocols": ["query"], "limit": 20}]))
    assert len(s.cells) == 2 * 2 and all(c.source_id is None and c.limit == 20 for c in s.cells)
    assert {json.loads(c.attack_params)["max_queries"] for c in s.cells} == {100, 200}


@pytest.mark.parametrize("protocols, attack, message", [
    (["black"], "square8", "square8 is a query attack: list it in a block of protocol query"),
    (["query"], "madry_pgd", "madry_pgd is a transfer attack"),
])
def test_query_and_transfer_attacks_stay_in_their_own_blocks(protocols, attack, message):
    block = {"targets": ["masked"], "attacks": [attack], "protocols": protocols}
    if protocols == ["black"]:
        block["sources"] = ["source"]
    with pytest.raises(UserError, match=message):
        parse_space(space(matrix=[block]))


def test_black_box_cells_skip_the_source_and_white_box_cells_are_the_diagonal():
    s = parse_space(space(matrix=[{"sources": ["source"], "targets": "all", "attacks": ["madry_fgsm", "madry_pgd"],
                                   "protocols": ["black", "white"], "limit": 100}]))
    source = s.group("source").models[0].model_id
    black = [c for c in s.cells if c.protocol == "black"]
    white = [c for c in s.cells if c.protocol == "white"]
    assert len(black) == 2 * 2 and all(c.source_id == source != c.target_id for c in black)
    assert len(white) == 3 * 2 and all(c.source_id == c.target_id for c in white)
    assert all(c.limit == 100 for c in s.cells)
    assert json.loads(black[0].attack_params)["eps_255"] == 8


def test_limit_defaults_to_the_attack_settings_own():
    s = parse_space(space(matrix=[{"sources": ["source"], "targets": ["masked"], "attacks": ["madry_pgd", "cw40"],
                                   "protocols": ["black"]}]))
    assert {c.attack: c.limit for c in s.cells} == {"madry_pgd": SETTINGS["madry_pgd"].limit, "cw40": SETTINGS["cw40"].limit}


def test_noise_and_shuffle_cells_have_no_source_and_paper_defaults():
    s = parse_space(space(matrix=[{"targets": ["masked"], "protocols": ["noise", "shuffle"]}]))
    noise = [json.loads(c.attack_params)["sigma_255"] for c in s.cells if c.protocol == "noise"]
    patches = {json.loads(c.attack_params)["patches"] for c in s.cells if c.protocol == "shuffle"}
    paper_sigmas = PROTOCOLS["noise"].defaults
    assert sorted(set(noise)) == list(paper_sigmas) and len(noise) == 2 * len(paper_sigmas)
    assert patches == {2, 4, 8} and all(c.source_id is None for c in s.cells)


def test_cell_keys_match_the_store_keys(tmp_path):
    s = parse_space(space())
    rows = [{**cell.__dict__, "n_crafted": 1, "n_fooled_source": 1, "n_evaluated": 1, "n_defended": 0, "defense_rate": 0.0}
            for cell in s.cells]
    store = Store(tmp_path)
    store.add_matrix(rows)
    assert store.matrix_keys() == {c.key() for c in s.cells}


def test_data_override_changes_ids_by_data_set_not_by_path():
    plain = parse_space(space())
    here = parse_space(space(), data="folder:../shared/data/cifar10-jpeg")
    there = parse_space(space(), data="folder:/mnt/big/cifar10-jpeg")
    assert here.data == "folder:../shared/data/cifar10-jpeg"
    assert [m.model_id for m in here.models()] == [m.model_id for m in there.models()]
    assert not {m.model_id for m in here.models()} & {m.model_id for m in plain.models()}


BAD = [
    ("models: [\n  - name: a\n    arch: resnet18\n   bad", "not valid YAML"),
    ("data: cifar10\nmodels: [{name: a, arch: resnet18}]\ndata: mnist\n", "key 'data' appears twice"),
    ("data: cifar10\nmodels: [{name: a, arch: resnet18, shalow_ratio: 0.5}]\n",
     "models[0].shalow_ratio: unknown field (did you mean shallow_ratio?)"),
    ("data: cifar10\nsweep: 1\nmodels: [{name: a, arch: resnet18}]\n", "sweep: unknown field"),
    ("data: cifar10\nrecipe: {name: quick, weight_decay: 1.0e+300}\nmodels: [{name: a, arch: resnet18}]\n",
     "recipe: weight_decay must be a number <= 3.403e+38, got 1e+300"),
    ("data: cifar10\nmodels: [{name: a, arch: resnet18}, {name: b, arch: resnet18, shallow_ratio: [0.5, 1.2]}]\n",
     "models[1].shallow_ratio[1]: 1.2 is outside [0, 1)"),
    ("data: cifar10\nmodels: [{name: a, arch: resnet18, shallow_ratio: 1.2}]\n", "models[0].shallow_ratio: 1.2 is outside [0, 1)"),
    ("data: cifar10\nmodels: [{name: a, arch: resnet18, seed: []}]\n", "models[0].seed: empty list"),
    ("data: cifar10\nmodels: []\n", "models: expected a non-empty list"),
    ("models: [{name: a, arch: resnet18}]\n", "data: missing"),
    ("data: imagenet\nmodels: [{name: a, arch: resnet18}]\n", "data: unknown data set"),
    ("data: cifar10\nmodels: [{name: a, arch: resnet181}]\n", "models[0].arch: unknown architecture 'resnet181'; did you mean resnet18?"),
    ("data: cifar10\nmodels: [{name: a, arch: resnet18, variant: rand}]\n", "models[0].variant: unknown mask variant"),
    ("data: cifar10\nmodels: [{name: a, arch: resnet18}, {name: a, arch: vgg19}]\n", "models[1].name: group name 'a' is used twice"),
    ("data: cifar10\nrecipe: {name: quick, lr: 5e-4}\nmodels: [{name: a, arch: resnet18}]\n", "recipe.lr: '5e-4' is text"),
    ("data: cifar10\nmodels: [{name: a, arch: resnet18, seed: 1.0e23}]\n",
     "models[0].seed: '1.0e23' is text, not a number (YAML reads an exponent only after a dot and with a sign: "
     "write 1.0e+23)"),
    ("data: cifar10\nmodels: [{name: a, arch: resnet18, seed: 1.0e+23}]\n",
     "models[0].seed must be an integer in [0, 2**63), got 1e+23"),
    ("data: cifar10\nmodels: [{name: a, arch: resnet18, width: .inf}]\n", "models[0].width must be a finite number, got inf"),
    ("data: cifar10\nrecipe: {name: quick, lr: .inf}\nmodels: [{name: a, arch: resnet18}]\n",
     "recipe.lr must be a finite number, got inf"),
    ("data: cifar10\nrecipe: {name: quick, epochs: 0}\nmodels: [{name: a, arch: resnet18}]\n", "recipe: epochs must be a positive"),
    ("data: cifar10\nrecipe: fastest\nmodels: [{name: a, arch: resnet18}]\n", "recipe: unknown recipe"),
    ("data: cifar10\ntrain_subset: -5\nmodels: [{name: a, arch: resnet18}]\n", "train_subset must be a positive integer, got -5"),
    ("data: cifar10\nresources: {gpus_per_trial: -1}\nmodels: [{name: a, arch: resnet18}]\n", "resources.gpus_per_trial"),
    ("data: cifar10\nmodels: [{name: a, arch: resnet18, shallow_ratio: 0.5, ensemble: 1}]\n",
     "models[0].ensemble.size must be an integer >= 2, got 1"),
    ("data: cifar10\nmodels: [{name: a, arch: resnet18, shallow_ratio: 0.5, ensemble: {size: 5, seeds: same}}]\n",
     "models[0].ensemble.seeds: unknown way of choosing member seeds 'same'"),
    ("data: cifar10\nmodels: [{name: a, arch: resnet18, ensemble: {size: 5, seeds: shared}}]\n",
     "models[0].ensemble: members with shared training seeds differ only by mask seed"),
    ("data: cifar10\nmodels: [{name: a, arch: resnet18, shallow_ratio: 0.5}, {name: b, arch: resnet18, shallow_ratio: 0.5, "
     "mask_seed: 1}]\nmatrix: [{sources: [a], targets: [b], attacks: [pgd16], protocols: [gray]}]\n",
     "shares training seed 0 with its source"),
    ("data: cifar10\nmodels: [{name: a, arch: resnet18}]\nmatrix: [{sources: [b], targets: all, attacks: [madry_pgd], protocols: [black]}]\n",
     "matrix[0].sources[0]: unknown model group 'b'"),
    ("data: cifar10\nmodels: [{name: a, arch: resnet18}]\nmatrix: [{sources: [a], targets: all, attacks: [pgd8], protocols: [black]}]\n",
     "matrix[0].attacks[0]: unknown attack setting 'pgd8'"),
    ("data: cifar10\nmodels: [{name: a, arch: resnet18}]\nmatrix: [{targets: all, attacks: [madry_pgd], protocols: [black]}]\n",
     "matrix[0].sources: missing"),
    ("data: cifar10\nmodels: [{name: a, arch: resnet18}]\nmatrix: [{targets: all, protocols: [blackbox]}]\n",
     "matrix[0].protocols[0]: unknown protocol 'blackbox'"),
    ("data: cifar10\nmodels: [{name: a, arch: resnet18}]\nmatrix: [{targets: all, protocols: [noise], patches: [2]}]\n",
     "matrix[0].patches: only used by protocol shuffle"),
    ("data: cifar10\nmodels: [{name: a, arch: resnet18}, {name: b, arch: vgg19}]\n"
     "matrix: [{sources: [a], targets: [b], attacks: [madry_pgd], protocols: [gray]}]\n", "gray-box pairs need one architecture"),
    ("data: cifar10\nmodels: [{name: a, arch: resnet18}, {name: b, arch: vgg19}]\n"
     "matrix: [{sources: [a], targets: [b], attacks: [madry_pgd], protocols: [noise]}]\n",
     "matrix[0].sources: only used by protocol black or gray"),
    ("data: cifar10\nmodels: [{name: a, arch: resnet18}]\nmatrix: [{sources: [a], targets: [a], attacks: [madry_pgd], protocols: [black]}]\n",
     "matrix[0]: gives no matrix cell"),
]


@pytest.mark.parametrize("text, message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_spaces_name_the_file_and_field(tmp_path, text, message):
    path = write_space(tmp_path / "bad.yaml", text)
    with pytest.raises(UserError) as info:
        load_space(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)
    assert "\n" not in str(info.value)


def test_a_space_that_is_not_utf8_text_names_the_byte(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"data: cifar10\nname: caf\xe9\n")  # Latin-1, not UTF-8
    with pytest.raises(UserError) as info:
        load_space(path)
    assert str(info.value) == f"{path}: not a YAML text file: byte 0xe9 at offset 23 is not UTF-8"


# The four malformed files the issue names: each fails with one line and exit status 2, without
# ever importing Ray (the command validates before it starts a cluster).
CLI_BAD = {
    "bad_yaml": ("models: [\n  - name: a\n   bad", "not valid YAML"),
    "unknown_field": ("data: cifar10\nmodels: [{name: a, arch: resnet18, colour: red}]\n", "models[0].colour: unknown field"),
    "ratio": ("data: cifar10\nmodels: [{name: a, arch: resnet18, shallow_ratio: 1.2}]\n", "1.2 is outside [0, 1)"),
    "empty_grid": ("data: cifar10\nmodels: [{name: a, arch: resnet18, width: []}]\n", "models[0].width: empty list"),
}
def test_malformed_spaces_exit_2_with_one_line_before_ray_starts(tmp_path):
    procs = {}
    for name, (text, _) in CLI_BAD.items():  # in parallel: each run is mostly Python start-up
        path = write_space(tmp_path / f"{name}.yaml", text)
        procs[name] = (path, probe_command("rm_sweep.sweep", str(path), "--store", str(tmp_path / "store")))
    for name, (path, proc) in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 2, (name, stderr)
        assert stderr.strip().splitlines() == [stderr.strip()] and CLI_BAD[name][1] in stderr, name
        assert stderr.startswith(f"error: {path}: ")
        assert stdout.strip() == "ray not imported", name
    assert not (tmp_path / "store").exists()
