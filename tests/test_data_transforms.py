"""Transforms of the vtab, vtab_tfds and fgvc protocols."""
import pytest
import torch
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms as T

from grft_vision.data import create_transforms

IN21K_VIT = "vit_base_patch16_224.augreg_in21k"


def _ops(transform, kind):
    return [op for op in transform.transforms if isinstance(op, kind)]


@pytest.mark.parametrize("protocol, interpolation", [("vtab", "bicubic"), ("vtab_tfds", "bilinear")])
@pytest.mark.parametrize("train", [True, False])
def test_vtab_squash_resize_no_augmentation(protocol, interpolation, train):
    transform = create_transforms(IN21K_VIT, protocol, train=train)
    (resize,) = _ops(transform, T.Resize)
    assert resize.size == (224, 224) and resize.interpolation.value == interpolation
    assert not _ops(transform, (T.RandomHorizontalFlip, RandomResizedCropAndInterpolation, T.ColorJitter))
    (normalize,) = _ops(transform, T.Normalize)
    assert normalize.mean.tolist() == [0.5] * 3 and normalize.std.tolist() == [0.5] * 3
    image = Image.new("RGB", (50, 20), (255, 0, 0))
    output = transform(image)
    assert output.shape == (3, 224, 224) and output.dtype == torch.float32
    assert torch.allclose(output[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))


def test_fgvc_train():
    transform = create_transforms({"input_size": (3, 224, 224)}, "fgvc", train=True)
    (crop,) = _ops(transform, RandomResizedCropAndInterpolation)
    assert crop.size == (224, 224) and crop.scale == (0.08, 1.0)
    assert [op.p for op in _ops(transform, T.RandomHorizontalFlip)] == [0.5]
    assert not _ops(transform, T.ColorJitter)
    assert transform(Image.new("RGB", (300, 200))).shape == (3, 224, 224)


@pytest.mark.parametrize("size, resize", [(224, 248), (384, 425)])
def test_fgvc_eval(size, resize):
    transform = create_transforms({"input_size": (3, size, size), "mean": (0.5,) * 3, "std": (0.5,) * 3},
                                  "fgvc", train=False)
    (resize_op,) = _ops(transform, T.Resize)
    assert resize_op.size == resize and resize_op.interpolation.value == "bicubic"
    assert _ops(transform, T.CenterCrop)[0].size == (size, size)
    assert transform(Image.new("RGB", (500, 400))).shape == (3, size, size)


def test_overrides_and_model_input():
    model = torch.nn.Conv2d(3, 4, 3)
    model.pretrained_cfg = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    transform = create_transforms(model, "vtab", train=False, interpolation="nearest",
                                  mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    (resize,) = _ops(transform, T.Resize)
    assert resize.size == (32, 32) and resize.interpolation.value == "nearest"
    output = transform(Image.new("RGB", (8, 8), (255, 255, 255)))
    assert output.shape == (3, 32, 32) and torch.allclose(output, torch.ones_like(output))


def test_unknown_protocol():
    with pytest.raises(ValueError, match="vtab_tfds"):
        create_transforms(IN21K_VIT, "imagenet", train=False)


def test_contrastive_and_protocol_transforms_follow_the_size_the_model_runs_at():
    """A ViT created with img_size=32 keeps input_size 224 in its pretrained_cfg; the crops must be 32 px."""
    import timm

    from grft_vision.data import contrastive_transform

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    assert model.pretrained_cfg["input_size"] == (3, 224, 224)
    image = Image.new("RGB", (64, 48), (10, 200, 30))
    assert contrastive_transform(model)(image).shape == (3, 32, 32)
    assert create_transforms(model, "fgvc", train=False)(image).shape == (3, 32, 32)
    resnet = timm.create_model("resnet18", pretrained=False)  # no patch embedding: its config's size
    assert contrastive_transform(resnet)(image).shape == (3, 224, 224)
