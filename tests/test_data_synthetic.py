"""The synthetic dataset: deterministic, balanced, disjoint splits, and learnable."""
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from grft_vision.data import SyntheticImageDataset, create_dataset


def _pixels(dataset, size=8):
    """Images downsampled to ``size``×``size``, flattened to ``[N, size*size*3]`` floats, and labels."""
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    features = np.stack([np.asarray(image.resize((size, size), Image.BILINEAR), np.float32).ravel() / 255
                         for image in images])
    return features, np.array(labels)


def test_items_are_pil_images():
    dataset = SyntheticImageDataset(num_samples=3, image_size=24)
    image, label = dataset[2]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (24, 24)
    assert label == 2 and dataset.num_classes == 10 and len(dataset) == 3
    with pytest.raises(IndexError):
        dataset[3]


def test_deterministic():
    first, second = SyntheticImageDataset(num_samples=20), SyntheticImageDataset(num_samples=20)
    other_seed = SyntheticImageDataset(num_samples=20, seed=1)
    for index in range(20):
        assert first[index][0].tobytes() == second[index][0].tobytes()
    assert any(first[i][0].tobytes() != other_seed[i][0].tobytes() for i in range(20))


def test_train_test_disjoint():
    train = {SyntheticImageDataset(num_samples=200, split="train")[i][0].tobytes() for i in range(200)}
    test = {SyntheticImageDataset(num_samples=200, split="test")[i][0].tobytes() for i in range(200)}
    assert len(train) == 200 and not train & test


def test_class_balance():
    dataset = SyntheticImageDataset(num_classes=7, num_samples=70)
    assert Counter(dataset[i][1] for i in range(70)) == {label: 10 for label in range(7)}


def test_learnable_by_nearest_centroid():
    x_train, y_train = _pixels(SyntheticImageDataset(num_samples=500, split="train"))
    x_test, y_test = _pixels(SyntheticImageDataset(num_samples=300, split="test"))
    centroids = np.stack([x_train[y_train == label].mean(0) for label in range(10)])
    predictions = ((x_test[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (predictions == y_test).mean() > 0.4  # chance: 0.1


def test_factory_split_aliases():
    train = create_dataset("synthetic", "train800val200", num_samples=4, num_classes=3, image_size=16)
    assert train.split == "train" and train.num_classes == 3 and len(train) == 4
    assert create_dataset("synthetic", "trainval", num_samples=2).split == "train"
    assert create_dataset("synthetic", "test", num_samples=2).split == "test"
    with pytest.raises(ValueError, match="split"):
        create_dataset("synthetic", "val200")
    with pytest.raises(ValueError, match="split"):
        SyntheticImageDataset(split="val")
