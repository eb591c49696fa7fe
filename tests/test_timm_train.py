"""GRFT inside timm's train.py: its pieces run as train.py runs them, on a tiny ViT (CPU, random weights).

create_model (from an initial checkpoint) -> apply_grft with a selection loader built from timm's data config
-> create_optimizer_v2 with weight decay and layer decay -> ModelEmaV3 -> CheckpointSaver -> a resume, then
``python -m grft_vision.export`` and a strict load into a plain timm model with equal outputs. Both savers are
covered: timm's own (the wrapped model, backbone included) and adapter-only (``unwrap_fn=adapter_only``).
"""
from __future__ import annotations

from argparse import Namespace
from pathlib import Path

import pytest
import timm
import torch
from timm.data import resolve_data_config
from timm.models import resume_checkpoint as timm_resume_checkpoint
from timm.optim import create_optimizer_v2
from timm.utils import CheckpointSaver, ModelEmaV3
from torch.utils.data import DataLoader

from grft_vision import GRFTConfig, L2ToPretrained, apply_grft
from grft_vision.data import TwoViews, contrastive_transform, create_dataset
from grft_vision.export import main as export_main
from grft_vision.integrations.timm import adapter_only, load_ema_checkpoint, resume_checkpoint

# what train.py keeps in `args` (and CheckpointSaver saves): the model, its classes and its --model-kwargs
ARGS = Namespace(model="vit_tiny_patch16_224", num_classes=4, model_kwargs={"img_size": 32, "depth": 2},
                 in_chans=None, input_size=None, gp=None, img_size=32)
EPOCHS = 3


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def initial_checkpoint(tmp_path_factory) -> Path:
    """The "pre-trained" weights train.py starts from (--initial-checkpoint)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "pretrained.pth"
    torch.save(timm.create_model(ARGS.model, num_classes=ARGS.num_classes, **ARGS.model_kwargs).state_dict(), path)
    return path


def train_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    return [(torch.randn(8, 3, 32, 32, generator=generator), torch.arange(8) % ARGS.num_classes) for _ in range(2)]


def build(initial_checkpoint: Path, saver_kind: str, output: Path):
    """train.py's set-up with the recipe of docs/usage.md: the lines after create_model."""
    torch.manual_seed(1)
    model = timm.create_model(ARGS.model, pretrained=False, num_classes=ARGS.num_classes,
                              checkpoint_path=str(initial_checkpoint), **ARGS.model_kwargs)
    data_config = resolve_data_config(vars(ARGS), model=model)
    # --- the recipe: selection data with GPS's contrastive views, from timm's data config ---
    selection_set = create_dataset("synthetic", "train", num_classes=ARGS.num_classes, num_samples=16, image_size=40)
    selection_set.transform = TwoViews(contrastive_transform(data_config))
    apply_grft(model, config=GRFTConfig(structure="row", k=1, reg_lambda=1e-4),
               dataloader=DataLoader(selection_set, batch_size=8), progress=False)
    regularizer = L2ToPretrained(model, model.grft_state.config)
    # --- train.py as it is ---
    optimizer = create_optimizer_v2(model, opt="adamw", lr=1e-2, weight_decay=0.05, layer_decay=0.75)
    model_ema = ModelEmaV3(model, decay=0.5)
    output.mkdir(exist_ok=True)  # train.py's get_outdir
    options = {"unwrap_fn": adapter_only} if saver_kind == "adapter_only" else {}
    saver = CheckpointSaver(model=model, optimizer=optimizer, args=ARGS, model_ema=model_ema, checkpoint_dir=str(output),
                            recovery_dir=str(output), max_history=2, **options)
    return model, regularizer, optimizer, model_ema, saver


def train_epochs(parts, first: int, last: int) -> None:
    model, regularizer, optimizer, model_ema, saver = parts
    loss_fn = torch.nn.CrossEntropyLoss()
    updates = first * len(train_data())
    for epoch in range(first, last):
        model.train()
        for images, labels in train_data():
            loss = loss_fn(model(images), labels) + regularizer()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            updates += 1
            model_ema.update(model, step=updates)
        saver.save_checkpoint(epoch, metric=-float(loss.detach()))


def adapter_values(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters() if "adapters" in name
            or "grft_updates" in name}


@pytest.mark.parametrize("saver_kind", ["timm", "adapter_only"])
def test_train_py_pieces_resume_export_and_strict_load(initial_checkpoint, tmp_path, saver_kind, capsys):
    straight = build(initial_checkpoint, saver_kind, tmp_path / "straight")
    model, _, optimizer, _, _ = straight
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    grouped = [p for group in optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in grouped} == trainable and len(grouped) == len(trainable)  # frozen weights: no state
    assert len({group["lr_scale"] for group in optimizer.param_groups}) > 2  # timm's layer decay found the blocks
    train_epochs(straight, 0, EPOCHS)

    interrupted = build(initial_checkpoint, saver_kind, tmp_path / "resumed")
    train_epochs(interrupted, 0, 2)
    resumed = build(initial_checkpoint, saver_kind, tmp_path / "resumed")  # a new process: train.py --resume
    last = tmp_path / "resumed" / "last.pth.tar"
    if saver_kind == "timm":
        start = timm_resume_checkpoint(resumed[0], str(last), optimizer=resumed[2])
        resumed[3].module.load_state_dict(torch.load(last, weights_only=False)["state_dict_ema"])
    else:
        start = resume_checkpoint(resumed[0], last, optimizer=resumed[2])
        load_ema_checkpoint(resumed[3], last)
    assert start == 2
    train_epochs(resumed, start, EPOCHS)
    for ours, theirs in ((resumed[0], straight[0]), (resumed[3].module, straight[3].module)):
        expected = adapter_values(theirs)
        assert expected and all(torch.allclose(value, expected[name], atol=1e-6)
                                for name, value in adapter_values(ours).items())

    base = ["--base", str(initial_checkpoint)] if saver_kind == "adapter_only" else []
    images = train_data()[0][0][:4]
    # the live weights by default, as timm's validate.py / clean_checkpoint.py; --use-ema (or --ema) the EMA's
    for flag, reference, merged in (([], resumed[0], "state_dict (the checkpoint also holds the EMA's"),
                                    (["--use-ema"], resumed[3].module, "state_dict_ema)")):
        out = tmp_path / f"merged{''.join(flag)}.pth"
        capsys.readouterr()
        assert export_main([str(last), "--out", str(out), *base, *flag]) == 0
        assert f"(from {merged}" in capsys.readouterr().out
        plain = timm.create_model(ARGS.model, num_classes=ARGS.num_classes, checkpoint_path=str(out),
                                  **ARGS.model_kwargs).eval()  # timm loads it strictly
        assert not any("grft" in key for key in plain.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(plain(images), reference.eval()(images), atol=1e-5, rtol=1e-5)


def test_adapter_only_checkpoints_are_adapter_sized(initial_checkpoint, tmp_path):
    sizes = {}
    for kind in ("timm", "adapter_only"):
        parts = build(initial_checkpoint, kind, tmp_path / kind)
        train_epochs(parts, 0, 1)
        sizes[kind] = (tmp_path / kind / "last.pth.tar").stat().st_size
    assert sizes["adapter_only"] < sizes["timm"] / 20, sizes

