"""VTAB-1k: label rules, the official split table, the TFDS route (mocked) and the folder route."""
import importlib.util
import warnings

import numpy as np
import pytest
import tensorflow_datasets as tfds
import torch
from PIL import Image
from tensorflow_datasets.testing import mocking

from grft_vision.data import (
    VTAB_TASKS,
    DataNotFoundError,
    VtabFolderDataset,
    VtabTfdsDataset,
    create_dataset,
    select_tfds_version,
)
from grft_vision.data.vtab_tasks import (
    clevr_count_rule,
    clevr_dist_rule,
    dsprites_loc_rule,
    dsprites_ori_rule,
    kitti_rule,
    smallnorb_azi_rule,
    smallnorb_ele_rule,
)

IMAGE = np.zeros((4, 4, 3), np.uint8)

# benchmark-protocols.md §1: task -> (tfds name:version, train800, val200, test, classes, folder name).
EXPECTED_TABLE = {
    "cifar100": ("cifar100:3.0.2", "train[:800]", "train[45000:45200]", "test", 100, "cifar"),
    "caltech101": ("caltech101:3.0.1", "train[:800]", "train[2754:2954]", "test", 102, "caltech101"),
    "dtd": ("dtd:3.0.1", "train[:800]", "validation[:200]", "test", 47, "dtd"),
    "flowers102": ("oxford_flowers102:2.1.1", "train[:800]", "validation[:200]", "test", 102,
                   "oxford_flowers102"),
    "pets": ("oxford_iiit_pet:3.2.0", "train[:800]", "train[2944:3144]", "test", 37, "oxford_iiit_pet"),
    "svhn": ("svhn_cropped:3.0.0", "train[:800]", "train[65931:66131]", "test", 10, "svhn"),
    "sun397": ("sun397/tfds:4.0.0", "train[:800]", "validation[:200]", "test", 397, "sun397"),
    "patch_camelyon": ("patch_camelyon:2.0.0", "train[:800]", "validation[:200]", "test", 2,
                       "patch_camelyon"),
    "eurosat": ("eurosat/rgb:2.0.0", "train[:800]", "train[16200:16400]", "train[21600:]", 10, "eurosat"),
    "resisc45": ("resisc45:3.0.0", "train[:800]", "train[18900:19100]", "train[25200:]", 45, "resisc45"),
    "diabetic_retinopathy": ("diabetic_retinopathy_detection/btgraham-300:3.0.0", "train[:800]",
                             "validation[:200]", "test", 5, "diabetic_retinopathy"),
    "clevr_count": ("clevr:3.1.0", "train[:800]", "train[63000:63200]", "validation", 8, "clevr_count"),
    "clevr_dist": ("clevr:3.1.0", "train[:800]", "train[63000:63200]", "validation", 6, "clevr_dist"),
    "dmlab": ("dmlab:2.0.1", "train[:800]", "validation[:200]", "test", 6, "dmlab"),
    "kitti": ("kitti:3.2.0", "train[:800]", "validation[:200]", "test", 4, "kitti"),
    "dsprites_loc": ("dsprites:2.0.0", "train[:800]", "train[589824:590024]", "train[663552:]", 16,
                     "dsprites_loc"),
    "dsprites_ori": ("dsprites:2.0.0", "train[:800]", "train[589824:590024]", "train[663552:]", 16,
                     "dsprites_ori"),
    "smallnorb_azi": ("smallnorb:2.0.0", "train[:800]", "test[:200]", "test[50%:]", 18, "smallnorb_azi"),
    "smallnorb_ele": ("smallnorb:2.0.0", "train[:800]", "test[:200]", "test[50%:]", 9, "smallnorb_ele"),
}


# --- label rules -------------------------------------------------------------------------------------

def _clevr(depths):
    coords = np.array([[10.0, 20.0, d] for d in depths], np.float32).reshape(-1, 3)
    return {"image": IMAGE, "objects": {"pixel_coords": coords, "size": np.zeros(len(depths), np.int64)}}


@pytest.mark.parametrize("num_objects, label", [(3, 0), (5, 2), (10, 7)])
def test_clevr_count(num_objects, label):
    assert clevr_count_rule(_clevr([9.0] * num_objects))[1] == label


@pytest.mark.parametrize("depths, label", [
    ([12.0, 8.7, 15.0], 2),  # min 8.7: thresholds 0, 8, 8.5 are below
    ([8.5, 11.0], 1),  # exactly on a threshold: 8.5 is not < 8.5
    ([8.0], 0),
    ([0.5, 3.0], 0),
    ([9.75], 4),
    ([10.5, 40.0], 5),
])
def test_clevr_dist(depths, label):
    assert clevr_dist_rule(_clevr(depths))[1] == label


def _kitti(objects):
    types = np.array([t for t, _ in objects], np.int64)
    location = np.array([[1.0, 2.0, z] for _, z in objects], np.float32).reshape(-1, 3)
    return {"image": IMAGE, "objects": {"type": types, "location": location}}


@pytest.mark.parametrize("objects, label", [
    ([], 3),  # no object at all
    ([(3, 2.0), (4, 5.0)], 3),  # pedestrians / cyclists are ignored
    ([(0, 5.0), (3, 1.0)], 0),  # closest vehicle, not closest object
    ([(1, 8.0)], 0),  # exactly 8 m: not > 8
    ([(2, 15.0), (0, 30.0)], 1),
    ([(0, 20.0)], 1),
    ([(0, 30.0), (1, 45.0)], 2),
])
def test_kitti(objects, label):
    assert kitti_rule(_kitti(objects))[1] == label


def _dsprites(x_position=0, orientation=0):
    image = np.zeros((64, 64, 1), np.uint8)
    image[10:20, 30:40] = 1
    return {"image": image, "label_x_position": np.int64(x_position),
            "label_orientation": np.int64(orientation)}


@pytest.mark.parametrize("x_position, label", [(0, 0), (1, 0), (5, 2), (31, 15)])
def test_dsprites_loc(x_position, label):
    image, got = dsprites_loc_rule(_dsprites(x_position=x_position))
    assert got == label
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert set(np.unique(image)) == {0, 255} and image[15, 35].tolist() == [255, 255, 255]


@pytest.mark.parametrize("orientation, label", [(0, 0), (2, 0), (3, 1), (5, 2), (39, 15)])
def test_dsprites_ori(orientation, label):
    assert dsprites_ori_rule(_dsprites(orientation=orientation))[1] == label


def test_smallnorb():
    first = np.arange(96 * 96, dtype=np.uint8).reshape(96, 96, 1)
    example = {"image": first, "image2": np.full((96, 96, 1), 7, np.uint8),
               "label_azimuth": np.int64(17), "label_elevation": np.int64(4)}
    image, azimuth = smallnorb_azi_rule(example)
    assert azimuth == 17 and smallnorb_ele_rule(example)[1] == 4
    assert image.shape == (96, 96, 3)
    for channel in range(3):
        np.testing.assert_array_equal(image[..., channel], first[..., 0])


# --- split table -------------------------------------------------------------------------------------

def test_split_table_matches_reference():
    assert set(VTAB_TASKS) == set(EXPECTED_TABLE)
    for name, (tfds_id, train800, val200, test, num_classes, folder) in EXPECTED_TABLE.items():
        task = VTAB_TASKS[name]
        assert (task.tfds_id, task.num_classes, task.folder_name) == (tfds_id, num_classes, folder), name
        assert task.split("train800") == train800, name
        assert task.split("val200") == val200, name
        assert task.split("train800val200") == f"{train800}+{val200}", name
        assert task.split("test") == test, name
    assert {name for name, task in VTAB_TASKS.items() if task.manual_download} == {"resisc45",
                                                                                   "diabetic_retinopathy"}
    with pytest.raises(ValueError, match="train800val200"):
        VTAB_TASKS["dtd"].split("train")


# --- TFDS route (mocked) -----------------------------------------------------------------------------

class _ConsistentFakeGenerator(mocking.RandomFakeGenerator):
    """Fake examples whose variable-length fields share one length, as real nested sequences do."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, constant_dynamic_shape=True, **kwargs)


@pytest.fixture
def mock_tfds(monkeypatch):
    monkeypatch.setattr(mocking, "RandomFakeGenerator", _ConsistentFakeGenerator)
    with tfds.testing.mock_data(num_examples=6, num_sub_examples=4):
        yield


def _to_tensor(image):
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


@pytest.mark.parametrize("name", [
    "dtd", "clevr_count", "clevr_dist", "dsprites_loc", "dsprites_ori", "smallnorb_azi", "smallnorb_ele",
    "kitti",
])
def test_tfds_route(mock_tfds, tmp_path, name):
    dataset = VtabTfdsDataset(name, "train800val200", data_dir=tmp_path, transform=_to_tensor)
    assert len(dataset) == 6 and dataset.num_classes == VTAB_TASKS[name].num_classes
    for index in range(len(dataset)):
        image, label = dataset[index]
        assert image.ndim == 3 and image.shape[0] == 3 and image.dtype == torch.uint8
        assert isinstance(label, int) and 0 <= label < dataset.num_classes


def test_tfds_route_reads_official_split(tmp_path):
    requested = []

    def as_data_source(builder, split, **kwargs):
        requested.append((builder.name, str(builder.version), split))
        return [{"image": IMAGE, "label": np.int64(3)}]

    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        dataset = create_dataset("cifar100", "train800val200", data_dir=tmp_path)
        image, label = dataset[0]
    assert isinstance(dataset, VtabTfdsDataset) and dataset.protocol == "vtab_tfds"
    assert requested == [("cifar100", "3.0.2", "train[:800]+train[45000:45200]")]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and label == 3


def test_tfds_version_fallback(mock_tfds, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 4.0.0 is a known-compatible version: no warning
        assert VtabTfdsDataset("pets", "test", data_dir=tmp_path).tfds_id == "oxford_iiit_pet:4.0.0"
    with pytest.warns(UserWarning, match="svhn_cropped:3.0.0"):
        assert VtabTfdsDataset("svhn", "test", data_dir=tmp_path).tfds_id == "svhn_cropped:3.1.0"


def _prepare_fake_tfds(data_dir, name, version, split_sizes, num_classes):
    """Prepares a real array_record TFDS dataset named ``name:version`` without TensorFlow.

    Images are ``Tensor`` features (``Image`` encoding needs TensorFlow); ``origin`` is the index of the
    split an example was written to.
    """
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(5, 7, 3), dtype=np.uint8),
        "label": tfds.features.ClassLabel(num_classes=num_classes),
        "origin": tfds.features.Tensor(shape=(), dtype=np.int64),
    })
    with tfds.core.registered.skip_registration():
        class FakeBuilder(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version(version)

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=features)

            def _split_generators(self, dl_manager):
                return {split: self._generate_examples(origin, size)
                        for origin, (split, size) in enumerate(split_sizes.items())}

            def _generate_examples(self, origin, size):
                for i in range(size):
                    image = np.full((5, 7, 3), i % 256, np.uint8)
                    yield i, {"image": image, "label": i % num_classes, "origin": origin}

        FakeBuilder.name = name
    FakeBuilder(data_dir=data_dir, file_format="array_record").download_and_prepare()


def test_tfds_route_on_prepared_array_record(tmp_path):
    _prepare_fake_tfds(tmp_path, "dtd", "3.0.1", {"train": 900, "validation": 300, "test": 50}, 47)
    # pets: the reference 3.2.0 is prepared, although the installed tfds only builds 4.0.0
    _prepare_fake_tfds(tmp_path, "oxford_iiit_pet", "3.2.0", {"train": 3200, "test": 20}, 37)
    dataset = create_dataset("dtd", "train800val200", data_dir=tmp_path)
    assert isinstance(dataset, VtabTfdsDataset) and dataset.tfds_id == "dtd:3.0.1"
    assert len(dataset) == 1000
    assert [int(dataset.source[i]["origin"]) for i in (0, 799, 800, 999)] == [0, 0, 1, 1]  # train, validation
    image, label = dataset[3]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (7, 5)
    assert 0 <= label < 47
    assert len(VtabTfdsDataset("dtd", "test", data_dir=tmp_path)) == 50
    pets = VtabTfdsDataset("pets", "val200", data_dir=tmp_path)
    assert pets.tfds_id == "oxford_iiit_pet:3.2.0" and len(pets) == 200


def test_select_tfds_version_prefers_prepared(tmp_path):
    for version in ("3.0.0", "3.1.0"):
        (tmp_path / "kitti" / version).mkdir(parents=True)
        (tmp_path / "kitti" / version / "dataset_info.json").write_text("{}")
    with pytest.warns(UserWarning, match="kitti:3.1.0, not the reference kitti:3.2.0"):
        assert select_tfds_version(VTAB_TASKS["kitti"], str(tmp_path)) == "3.1.0"  # newest prepared
    (tmp_path / "kitti" / "3.2.0").mkdir()
    (tmp_path / "kitti" / "3.2.0" / "dataset_info.json").write_text("{}")
    assert select_tfds_version(VTAB_TASKS["kitti"], str(tmp_path)) == "3.2.0"


def test_tfds_not_prepared_error(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        VtabTfdsDataset("dtd", "test", data_dir=tmp_path)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "'dtd'" in message and str(tmp_path) in message
    assert "pip install 'grft-vision[tfds-prepare]'" in message
    assert f"tfds build dtd:3.0.1 --data_dir {tmp_path} --file_format array_record" in message


def test_tfds_manual_download_error(tmp_path):
    with pytest.raises(DataNotFoundError, match="downloads/manual"):
        VtabTfdsDataset("resisc45", "test", data_dir=tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None, reason="TensorFlow is installed")
def test_download_without_tensorflow(tmp_path):
    with pytest.raises(DataNotFoundError, match="needs TensorFlow") as info:
        VtabTfdsDataset("dtd", "test", data_dir=tmp_path, download=True)
    assert "pip install 'grft-vision[tfds-prepare]'" in str(info.value)


# --- folder route ------------------------------------------------------------------------------------

def _write_folder_task(root, folder, labels):
    task_dir = root / folder
    (task_dir / "images" / "train").mkdir(parents=True)
    lines = []
    for index, label in enumerate(labels):
        image_path = task_dir / "images" / "train" / f"{index}.jpg"
        Image.new("RGB", (8 + index, 6), (10 * index, 0, 0)).save(image_path)
        lines.append(f"images/train/{index}.jpg {label}")
    for split in ("train800", "val200", "train800val200", "test"):
        (task_dir / f"{split}.txt").write_text("\n".join(lines) + "\n")


def test_folder_route(tmp_path):
    _write_folder_task(tmp_path, "cifar", [0, 99, 5])
    dataset = VtabFolderDataset(tmp_path, "cifar100", "train800val200")
    assert len(dataset) == 3 and dataset.num_classes == 100 and dataset.protocol == "vtab"
    image, label = dataset[1]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (9, 6) and label == 99
    auto = create_dataset("cifar100", "test", data_dir=tmp_path)  # layout auto finds the list file
    assert isinstance(auto, VtabFolderDataset) and [label for _, label in auto.samples] == [0, 99, 5]


def test_folder_label_out_of_range(tmp_path):
    _write_folder_task(tmp_path, "dtd", [0, 47])
    with pytest.raises(ValueError, match="outside"):
        VtabFolderDataset(tmp_path, "dtd", "test")


def test_folder_missing_errors(tmp_path):
    with pytest.raises(DataNotFoundError, match="does not exist") as info:
        VtabFolderDataset(tmp_path / "absent", "clevr_dist", "test")
    assert "clevr_dist/test.txt" in str(info.value)
    _write_folder_task(tmp_path, "cifar", [1])
    (tmp_path / "cifar" / "val200.txt").unlink()
    with pytest.raises(DataNotFoundError, match="relative/path.jpg label") as info:
        create_dataset("cifar100", "val200", data_dir=tmp_path, layout="folder")
    assert str(tmp_path / "cifar" / "val200.txt") in str(info.value)
