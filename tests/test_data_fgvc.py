"""FGVC: VPT json layout, official layouts, layout detection and missing-data errors."""
import json

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from grft_vision.data import (
    DataNotFoundError,
    FgvcJsonDataset,
    FgvcOfficialDataset,
    contiguous_class_map,
    create_dataset,
    detect_fgvc_layout,
)


def _images(image_dir, paths):
    for index, path in enumerate(paths):
        (image_dir / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (10, 8), (index * 20, 50, 0)).save(image_dir / path)


def _labels(dataset):
    return {path.name: label for path, label in dataset.samples}


@pytest.fixture
def json_root(tmp_path):
    splits = {
        "train": {"001.A/a.jpg": 5, "017.B/b.jpg": 17},
        "val": {"009.C/c.jpg": 9},
        "test": {"017.B/d.jpg": 17, "042.D/e.jpg": 42},
    }
    _images(tmp_path / "images", [path for split in splits.values() for path in split])
    for split, entries in splits.items():
        (tmp_path / f"{split}.json").write_text(json.dumps(entries))
    return tmp_path


def test_contiguous_class_map():
    assert contiguous_class_map([42, 5, 17, 5, 9]) == {5: 0, 9: 1, 17: 2, 42: 3}


def test_json_layout(json_root):
    # ids {5, 9, 17, 42} over all json files -> 0, 1, 2, 3 in every split
    train = FgvcJsonDataset(json_root, "cub", "train")
    assert _labels(train) == {"a.jpg": 0, "b.jpg": 2}
    assert _labels(FgvcJsonDataset(json_root, "cub", "val")) == {"c.jpg": 1}
    assert _labels(FgvcJsonDataset(json_root, "cub", "test")) == {"d.jpg": 2, "e.jpg": 3}
    trainval = create_dataset("cub", "trainval", data_dir=json_root)
    assert isinstance(trainval, FgvcJsonDataset) and trainval.protocol == "fgvc"
    assert _labels(trainval) == {"a.jpg": 0, "b.jpg": 2, "c.jpg": 1}
    assert trainval.num_classes == 4
    image, label = trainval[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (10, 8)
    assert label == 0


def test_json_missing_split_file(json_root):
    (json_root / "val.json").unlink()
    assert len(FgvcJsonDataset(json_root, "cub", "train")) == 2
    with pytest.raises(DataNotFoundError, match="val.json"):
        FgvcJsonDataset(json_root, "cub", "trainval")


def _write_cub_style(root, rows):
    """rows: (image id, path, class id, is_train)."""
    (root / "images.txt").write_text("".join(f"{i} {path}\n" for i, path, _, _ in rows))
    (root / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, _, c, _ in rows))
    (root / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, _, t in rows))
    _images(root / "images", [path for _, path, _, _ in rows])


def test_official_cub(tmp_path):
    _write_cub_style(tmp_path, [
        (1, "001.A/a1.jpg", 1, 1), (2, "001.A/a2.jpg", 1, 0),
        (3, "002.B/b1.jpg", 2, 1), (4, "003.C/c1.jpg", 3, 0),
    ])
    assert detect_fgvc_layout(tmp_path, "cub") == "official"
    train = create_dataset("cub", "train", data_dir=tmp_path)
    assert isinstance(train, FgvcOfficialDataset) and train.num_classes == 3
    assert _labels(train) == {"a1.jpg": 0, "b1.jpg": 1}
    assert _labels(create_dataset("cub", "trainval", data_dir=tmp_path)) == _labels(train)
    assert _labels(create_dataset("cub", "test", data_dir=tmp_path, layout="official")) == {"a2.jpg": 0,
                                                                                           "c1.jpg": 2}
    assert train[1][0].mode == "RGB"
    with pytest.raises(ValueError, match="no validation split"):
        FgvcOfficialDataset(tmp_path, "cub", "val")


def test_official_nabirds_sparse_ids(tmp_path):
    _write_cub_style(tmp_path, [
        ("u1", "0817/x.jpg", 817, 1), ("u2", "0295/y.jpg", 295, 1), ("u3", "0817/z.jpg", 817, 0),
    ])
    assert _labels(FgvcOfficialDataset(tmp_path, "nabirds", "trainval")) == {"x.jpg": 1, "y.jpg": 0}


def test_official_flowers(tmp_path):
    savemat(tmp_path / "imagelabels.mat", {"labels": np.array([[3, 1, 3, 2]])})
    savemat(tmp_path / "setid.mat", {"trnid": np.array([[1, 2]]), "valid": np.array([[3]]),
                                     "tstid": np.array([[4]])})
    _images(tmp_path, [f"jpg/image_{i:05d}.jpg" for i in range(1, 5)])
    assert _labels(FgvcOfficialDataset(tmp_path, "flowers", "val")) == {"image_00003.jpg": 2}
    trainval = create_dataset("flowers", "trainval", data_dir=tmp_path)
    assert _labels(trainval) == {"image_00001.jpg": 2, "image_00002.jpg": 0, "image_00003.jpg": 2}
    assert _labels(FgvcOfficialDataset(tmp_path, "flowers", "test")) == {"image_00004.jpg": 1}


def test_official_dogs(tmp_path):
    paths = ["n1-A/a.jpg", "n2-B/b.jpg", "n1-A/c.jpg"]
    savemat(tmp_path / "train_list.mat", {"file_list": np.array([[p] for p in paths[:2]], dtype=object),
                                          "labels": np.array([[1.0], [2.0]])})
    savemat(tmp_path / "test_list.mat", {"file_list": np.array([[paths[2]]], dtype=object),
                                         "labels": np.array([[1.0]])})
    _images(tmp_path / "Images", paths)
    assert _labels(create_dataset("dogs", "trainval", data_dir=tmp_path)) == {"a.jpg": 0, "b.jpg": 1}
    test = FgvcOfficialDataset(tmp_path, "dogs", "test")
    assert _labels(test) == {"c.jpg": 0} and test[0][0].mode == "RGB"


def test_official_cars(tmp_path):
    annotations = np.zeros((3,), dtype=[("relative_im_path", object), ("class", object), ("test", object)])
    annotations["relative_im_path"] = ["car_ims/000001.jpg", "car_ims/000002.jpg", "car_ims/000003.jpg"]
    annotations["class"] = [196, 1, 196]
    annotations["test"] = [0, 1, 0]
    savemat(tmp_path / "cars_annos.mat", {"annotations": annotations[None, :]})
    _images(tmp_path, list(annotations["relative_im_path"]))
    assert _labels(create_dataset("cars", "train", data_dir=tmp_path)) == {"000001.jpg": 1, "000003.jpg": 1}
    assert _labels(FgvcOfficialDataset(tmp_path, "cars", "test")) == {"000002.jpg": 0}


def test_missing_root(tmp_path):
    with pytest.raises(DataNotFoundError, match="does not exist") as info:
        create_dataset("cub", "test", data_dir=tmp_path / "absent")
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    for expected in ("train.json", "val.json", "test.json", "images.txt", "image_class_labels.txt",
                     "train_test_split.txt"):
        assert expected in message


def test_empty_root(tmp_path):
    with pytest.raises(DataNotFoundError, match="neither layout") as info:
        detect_fgvc_layout(tmp_path, "cars")
    assert "cars_annos.mat" in str(info.value)
    with pytest.raises(DataNotFoundError, match="train_list.mat"):
        FgvcOfficialDataset(tmp_path, "dogs", "train")


def test_data_dir_required():
    with pytest.raises(ValueError, match="data_dir"):
        create_dataset("nabirds", "test")
