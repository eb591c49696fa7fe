"""The per-task configs reproduce the paper's Tables 6 and 7, and their budgets Table 8."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from grft_vision import trainable_parameters_report, unload_grft
from grft_vision.tuner.targets import find_target_layers
from grft_vision.tuner.model import inject as add_adapter
from grft_vision.data import VTAB_TASKS, dataset_num_classes
from grft_vision.config import ConfigError
from grft_vision.training.cli import resolve_settings
from grft_vision.training.config import builtin_config_dir

REPO = Path(__file__).resolve().parents[1]

# name: (lr, batch size, epochs, data subsets, lambda, regularised blocks, rows/columns) — GRFT Tables 6, 7
TABLE_7 = {
    "cifar100": (2e-3, 32, 100, 1, 1e-6, "all", 1), "caltech101": (2e-3, 16, 100, 1, 1e-8, 2, 1),
    "dtd": (2e-3, 16, 100, 1, 1e-8, 3, 1), "flowers102": (2e-3, 16, 100, 1, 1e-6, "all", 1),
    "pets": (3e-3, 32, 100, 1, 1e-3, "all", 2), "svhn": (5e-3, 32, 100, 1, 1e-3, 1, 4),
    "sun397": (2.5e-3, 16, 100, 1, 1e-6, 2, 1), "patch_camelyon": (4e-3, 32, 100, 1, 1e-7, "all", 2),
    "eurosat": (2e-3, 16, 100, 1, 1e-4, 3, 2), "resisc45": (1.5e-3, 16, 100, 1, 1e-3, "all", 3),
    "diabetic_retinopathy": (2e-3, 32, 100, 1, 1e-6, 1, 1), "clevr_count": (3e-4, 16, 100, 1, 0.0, 0, 3),
    "clevr_dist": (2e-3, 16, 100, 1, 1e-5, "all", 2), "dmlab": (1.5e-3, 16, 100, 1, 0.0, 0, 2),
    "kitti": (1e-3, 16, 100, 1, 1e-5, "all", 1), "dsprites_loc": (7e-3, 32, 100, 1, 1e-4, 5, 3),
    "dsprites_ori": (5e-4, 16, 100, 1, 0.0, 0, 2), "smallnorb_azi": (3e-3, 32, 100, 1, 1e-8, "all", 3),
    "smallnorb_ele": (3e-4, 32, 100, 1, 1e-3, 2, 2),
}
TABLE_6 = {
    "cub": (5e-3, 32, 100, 4, 1e-3, 2, 2), "nabirds": (1e-4, 32, 100, 1, 1e-4, 7, 26),
    "flowers": (1e-3, 32, 100, 1, 1e-4, 2, 1), "dogs": (2e-4, 64, 100, 2, 5e-5, 4, 5),
    "cars": (5e-4, 32, 100, 7, 1e-4, "all", 20),
}
# Table 8: learnable parameters (%) per task
TABLE_8 = {
    "cub": 0.47, "nabirds": 2.56, "flowers": 0.26, "dogs": 0.58, "cars": 2.22, "cifar100": 0.26,
    "caltech101": 0.26, "dtd": 0.22, "flowers102": 0.26, "pets": 0.28, "svhn": 0.41, "sun397": 0.53,
    "patch_camelyon": 0.25, "eurosat": 0.26, "resisc45": 0.37, "diabetic_retinopathy": 0.18,
    "clevr_count": 0.33, "clevr_dist": 0.26, "dmlab": 0.30, "kitti": 0.18, "dsprites_loc": 0.34,
    "dsprites_ori": 0.31, "smallnorb_azi": 0.34, "smallnorb_ele": 0.30,
}


# Table 8's budgets are those of columns for these tasks (rows give 0.26, 0.26, 0.26, 0.43, 1.79 %)
COLUMN_TASKS = {"dmlab", "dsprites_ori", "smallnorb_ele", "cub", "cars"}


def resolved(benchmark: str, name: str):
    train, grft, _ = resolve_settings(benchmark, ["--dataset", name], builtin_config_dir(benchmark))
    return train, grft


@pytest.mark.parametrize("benchmark, name, row", [("vtab", n, r) for n, r in TABLE_7.items()]
                         + [("fgvc", n, r) for n, r in TABLE_6.items()])
def test_config_matches_paper_table(benchmark, name, row):
    train, grft = resolved(benchmark, name)
    assert (train.lr, train.batch_size, train.epochs, grft.num_subsets, grft.reg_lambda, grft.reg_blocks,
            grft.k) == pytest.approx(row)
    assert train.model == "vit_base_patch16_224.augreg_in21k" and train.opt == "adam"
    assert train.warmup_epochs == 10 and train.sched == "cosine" and grft.conv_columns == "tap"
    assert grft.structure == ("column" if name in COLUMN_TASKS else "row")


def test_every_task_has_a_config():
    vtab, fgvc = builtin_config_dir("vtab"), builtin_config_dir("fgvc")
    assert {path.stem for path in vtab.glob("*.yaml")} - {"defaults", "synthetic"} == set(VTAB_TASKS)
    assert {path.stem for path in fgvc.glob("*.yaml")} - {"defaults"} == set(TABLE_6)


def test_configs_are_package_data_and_the_top_level_folder_shows_them():
    assert builtin_config_dir("vtab") == REPO / "grft_vision" / "configs" / "vtab"
    assert (REPO / "configs").resolve() == builtin_config_dir("vtab").parent


@pytest.mark.parametrize("benchmark, dataset, script", [("vtab", "cub", "train_fgvc.py"),
                                                        ("fgvc", "dtd", "train_vtab.py")])
def test_a_dataset_of_the_other_benchmark_names_its_script(benchmark, dataset, script):
    with pytest.raises(ConfigError, match=rf"'{dataset}' is not a {benchmark.upper()} dataset; run it with {script}"):
        resolve_settings(benchmark, ["--dataset", dataset], builtin_config_dir(benchmark))


def test_a_missing_builtin_config_is_an_error(tmp_path):
    import shutil

    folder = shutil.copytree(builtin_config_dir("vtab"), tmp_path / "vtab")
    (folder / "defaults.yaml").unlink()
    with pytest.raises(ConfigError, match=r"no config file .*defaults\.yaml: .* has configs for .*its own benchmark"):
        resolve_settings("vtab", ["--dataset", "dtd"], folder)


def test_a_config_folder_without_defaults_is_an_error(tmp_path):
    (tmp_path / "dtd.yaml").write_text("lr: 0.1\n")
    with pytest.raises(ConfigError, match="no config file .*defaults.yaml"):
        resolve_settings("vtab", ["--dataset", "dtd"], tmp_path)
    with pytest.raises(ConfigError, match="no built-in configs for 'imagenet'"):
        builtin_config_dir("imagenet")


def test_flags_override_config_values():
    train, grft, _ = resolve_settings("vtab", ["--dataset", "dtd", "--lr", "0.1", "--cols", "3", "--set",
                                               "temperature=0.2"], builtin_config_dir("vtab"))
    assert (train.lr, grft.structure, grft.k, grft.temperature, grft.reg_blocks) == (0.1, "column", 3, 0.2, 3)


@pytest.fixture(scope="module")
def vit_b():
    return timm.create_model("vit_base_patch16_224", pretrained=False)


@pytest.mark.parametrize("benchmark, name", [("vtab", n) for n in TABLE_7] + [("fgvc", n) for n in TABLE_6])
def test_trainable_share_matches_table_8(vit_b, benchmark, name):
    _, grft = resolved(benchmark, name)
    vit_b.reset_classifier(dataset_num_classes(name))
    # Which rows/columns are chosen does not change how many train: wrap the first k of every target, as
    # apply_grft would wrap its top k (scoring ViT-B/16 just to count would cost seconds per task).
    targets = find_target_layers(vit_b, grft)
    structures = {layer_name: grft.layer_structure(layer) for layer_name, layer in targets.items()}
    add_adapter(vit_b, "default", {layer_name: torch.arange(grft.k) for layer_name in targets}, structures, grft)
    try:
        percent = trainable_parameters_report(vit_b).percent
    finally:
        unload_grft(vit_b)
    assert round(percent, 2) == pytest.approx(TABLE_8[name], abs=0.011), percent
