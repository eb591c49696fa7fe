"""create_dataset / dataset_num_classes / DATASET_NAMES."""
import pytest

from grft_vision.data import DATASET_NAMES, FGVC_DATASETS, VTAB_TASKS, create_dataset, dataset_num_classes


def test_dataset_names():
    assert DATASET_NAMES == tuple(sorted(DATASET_NAMES))
    assert set(DATASET_NAMES) == {*VTAB_TASKS, *FGVC_DATASETS, "synthetic"} and len(DATASET_NAMES) == 25


@pytest.mark.parametrize("name, num_classes", [
    ("cifar100", 100), ("caltech101", 102), ("sun397", 397), ("clevr_count", 8), ("clevr_dist", 6),
    ("kitti", 4), ("dsprites_ori", 16), ("smallnorb_azi", 18), ("smallnorb_ele", 9),
    ("cub", 200), ("nabirds", 555), ("flowers", 102), ("dogs", 120), ("cars", 196), ("synthetic", 10),
])
def test_num_classes(name, num_classes):
    assert dataset_num_classes(name) == num_classes


def test_unknown_name_lists_valid_names_and_suggests():
    with pytest.raises(ValueError) as info:
        create_dataset("cifar10", "test")
    message = str(info.value)
    assert "Did you mean 'cifar100'?" in message
    assert ", ".join(DATASET_NAMES) in message
    with pytest.raises(ValueError, match="Did you mean 'smallnorb_azi'"):
        dataset_num_classes("smallnorb_azimuth")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="Layout 'json'"):
        create_dataset("dtd", "test", data_dir=tmp_path, layout="json")
    with pytest.raises(ValueError, match="download"):
        create_dataset("cub", "test", data_dir=tmp_path, download=True)
    with pytest.raises(TypeError, match="num_samples"):
        create_dataset("dtd", "test", num_samples=3)
