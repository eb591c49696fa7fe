"""On a CUDA device: the core's promises where CPU tests cannot look (skipped as a whole without CUDA).

- every structure on linear, convolution, depthwise and grouped convolution layers: forward and backward on CUDA
  equal to the same model on the CPU;
- bf16 and fp16 autocast (fp16 with a gradient scaler) against fp32;
- channels_last inputs and weights against contiguous ones;
- ``torch.compile`` (inductor) against eager;
- mixed-adapter batches against one adapter at a time;
- DistributedDataParallel over NCCL at world size 1 against the plain model;
- a bitsandbytes 4-bit base (``grft_vision.tuner.quantized.quantize_model``; skipped while that is absent).

``scripts/gpu_check.sh`` runs them (``python -m pytest -m cuda tests/test_cuda.py``). Comparisons across devices,
precisions and memory layouts allow 1 % of the compared tensor's largest value (10 % under autocast): cuDNN's
convolutions may use TF32, and a wrong row, column or entry is off by about the whole value.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import NUM_CLASSES, _free_port, images, make_model, random_scores, two_adapters
from grft_vision import GRFTConfig, apply_grft, mixed_adapters, set_adapter
from grft_vision.tuner.layer import grft_layers

pytestmark = pytest.mark.cuda

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (scripts/gpu_check.sh runs these on a GPU machine)", allow_module_level=True)

DEVICE = torch.device("cuda")
CONFIGS = {"row": {"structure": "row"}, "column": {"structure": "column"}, "sparse": {"structure": "sparse"},
           "tap_column": {"structure": "column", "conv_columns": "tap"}}
STRUCTURES = list(CONFIGS)
# "sequential": a dense, a depthwise and a grouped (reflect-padded, strided) convolution and two linears;
# "convnext": depthwise 7x7 convolutions and linear MLPs; "vit": the fused linear paths and the patch embedding
FAMILIES = ["sequential", "convnext", "vit"]


def _trained(family: str, structure: str, k: int = 2) -> nn.Module:
    """A tiny model (eval mode, CPU) wrapped with ``structure`` and random non-zero updates."""
    original = make_model(family)
    model = apply_grft(copy.deepcopy(original), random_scores(original), GRFTConfig(**CONFIGS[structure], k=k))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in grft_layers(model):
            layer.delta.copy_(torch.randn(layer.delta.shape, generator=generator) * 0.05)
    return model.eval()


def _projection(shape: torch.Size, device: torch.device) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)


def _step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Output, input gradient and parameter gradients of ``sum(model(x) * projection)``, on the CPU."""
    x = x.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out.float() * _projection(out.shape, out.device)).sum().backward()
    grads = {name.removeprefix("_orig_mod."): p.grad.detach().float().cpu()
             for name, p in model.named_parameters() if p.grad is not None}
    return out.detach().float().cpu(), x.grad.detach().float().cpu(), grads


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-2, what: str = "") -> None:
    """Largest difference within ``rel`` times the largest value of ``expected``."""
    actual, expected = actual.detach().float().cpu(), expected.detach().float().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: not finite"
    error, scale = (actual - expected).abs().max().item(), expected.abs().max().item()
    assert error <= rel * scale + 1e-6, f"{what}: largest difference {error:.3g}, largest value {scale:.3g}"


def _assert_steps_close(actual, expected, rel: float = 1e-2) -> None:
    _assert_close(actual[0], expected[0], rel, "output")
    _assert_close(actual[1], expected[1], rel, "input gradient")
    assert actual[2].keys() == expected[2].keys()
    assert any(name.endswith(".delta") for name in expected[2])
    for name, grad in expected[2].items():
        _assert_close(actual[2][name], grad, rel, name)


# --------------------------------------------------------------------------------------------- CUDA = CPU
def test_the_layer_kinds_are_all_wrapped():
    """The sequential model holds every layer kind the core treats apart: linear, dense, depthwise and grouped conv."""
    model = _trained("sequential", "row")
    kinds = set()
    for _, layer in grft_layers(model):
        base = layer.base_layer
        if isinstance(base, nn.Linear):
            kinds.add("linear")
        elif base.groups == 1:
            kinds.add("conv")
        elif base.groups == base.in_channels:
            kinds.add("depthwise")
        else:
            kinds.add("grouped")
    assert kinds == {"linear", "conv", "depthwise", "grouped"}


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_and_backward_on_cuda_equal_the_cpu(family, structure):
    model = _trained(family, structure)
    x = images(3, seed=2)
    on_cpu = _step(model, x)
    on_cuda = _step(copy.deepcopy(model).to(DEVICE), x.to(DEVICE))
    _assert_steps_close(on_cuda, on_cpu)


# --------------------------------------------------------------------------------------------- precision
@pytest.mark.parametrize("structure", ["row", "column", "sparse"])
def test_bfloat16_autocast_follows_float32(structure):
    model = _trained("vit", structure).to(DEVICE)
    x = images(3, seed=2).to(DEVICE)
    reference = _step(model, x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        autocast = _step(model, x)
    _assert_steps_close(autocast, reference, rel=0.1)
    assert all(layer.delta.grad.dtype == torch.float32 for _, layer in grft_layers(model))  # fp32 masters


@pytest.mark.parametrize("structure", ["row", "column", "sparse"])
def test_float16_autocast_with_a_gradient_scaler(structure):
    model = _trained("vit", structure).to(DEVICE)
    x, labels = images(4, seed=2).to(DEVICE), torch.arange(4, device=DEVICE) % NUM_CLASSES
    F.cross_entropy(model(x), labels).backward()
    reference = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 10)
    before = [p.detach().clone() for p in trainable]
    with torch.autocast("cuda", dtype=torch.float16):
        loss = F.cross_entropy(model(x), labels)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == reference.keys()
    for name, grad in reference.items():
        assert grads[name].dtype == torch.float32, name
        _assert_close(grads[name], grad, rel=0.1, what=name)
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0 ** 10  # no inf / NaN gradient: the step was taken
    assert any(not torch.equal(p, b) for p, b in zip(trainable, before))
    assert all(torch.isfinite(p).all() for p in trainable)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("family", ["sequential", "convnext", "resnet"])
def test_channels_last_equals_contiguous(family, structure):
    model = _trained(family, structure).to(DEVICE)
    x = images(3, seed=2).to(DEVICE)
    contiguous = _step(model, x)
    last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    _assert_steps_close(_step(last, x.contiguous(memory_format=torch.channels_last)), contiguous)


# --------------------------------------------------------------------------------------------- compile
@pytest.mark.parametrize("family, structure", [("vit", "sparse"), ("resnet", "column")])  # test_compile.py's quick pair
def test_inductor_equals_eager(family, structure):
    torch._dynamo.reset()
    model = _trained(family, structure).to(DEVICE)
    x = images(2, seed=2).to(DEVICE)
    eager = _step(model, x)
    compiled = _step(torch.compile(model), x)
    _assert_steps_close(compiled, eager)
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------- adapters
@pytest.mark.parametrize("structure", ["row", "column", "sparse"])
def test_a_mixed_batch_gives_each_sample_its_adapter(structure):
    _, model = two_adapters(structure=structure)
    names = ["b", None, "a", "b"]
    x = images(len(names), seed=3)

    def mixed(device: torch.device) -> torch.Tensor:
        moved = copy.deepcopy(model).to(device)
        with torch.no_grad(), mixed_adapters(moved, names):
            return moved(x.to(device))

    on_cuda = mixed(DEVICE)
    expected = []
    cuda_model = copy.deepcopy(model).to(DEVICE)
    for i, name in enumerate(names):
        set_adapter(cuda_model, name)
        with torch.no_grad():
            expected.append(cuda_model(x[i:i + 1].to(DEVICE)))
    _assert_close(on_cuda, torch.cat(expected), what="mixed batch against one adapter at a time")
    _assert_close(on_cuda, mixed(torch.device("cpu")), what="mixed batch on CUDA against the CPU")


def test_ddp_over_nccl_at_world_size_one():
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if not dist.is_available() or not dist.is_nccl_available():
        pytest.skip("torch.distributed has no NCCL here")
    model = _trained("vit", "row").to(DEVICE).train()
    plain = copy.deepcopy(model)
    x, labels = images(4, seed=2).to(DEVICE), torch.arange(4, device=DEVICE) % NUM_CLASSES
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(model, device_ids=[DEVICE.index or 0])
        optimizer = torch.optim.Adam([p for p in ddp.parameters() if p.requires_grad], lr=1e-2)
        F.cross_entropy(ddp(x), labels).backward()
        F.cross_entropy(plain(x), labels).backward()
        grads = {name: p.grad for name, p in plain.named_parameters() if p.grad is not None}
        assert grads and {name for name, p in model.named_parameters() if p.grad is not None} == set(grads)
        for name, param in model.named_parameters():
            if param.grad is not None:
                torch.testing.assert_close(param.grad, grads[name], msg=name)
        frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
        optimizer.step()
        assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if not p.requires_grad)
        assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), plain.parameters()) if p.requires_grad)
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------- quantized base
@pytest.mark.parametrize("structure", ["row", "column", "sparse"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bitsandbytes_4bit_base(quant_type, structure):
    """GRFT on a 4-bit base: exact at zero update, gradients reach the updates only, a step changes the output."""
    pytest.importorskip("bitsandbytes")
    quantized = pytest.importorskip("grft_vision.tuner.quantized")
    if not hasattr(quantized, "quantize_model"):
        pytest.skip("grft_vision.tuner.quantized has no quantize_model yet")
    model = make_model("vit").to(DEVICE)
    model = quantized.quantize_model(model, quant_type=quant_type) or model
    model = model.to(DEVICE)
    x, labels = images(4, seed=2).to(DEVICE), torch.arange(4, device=DEVICE) % NUM_CLASSES
    with torch.no_grad():
        base = model(x).float()
    apply_grft(model, config=GRFTConfig(structure=structure, k=2, score="random"))
    layers = dict(grft_layers(model))
    assert layers
    with torch.no_grad():
        _assert_close(model(x), base, what="zero update on the quantized base")
    trainable = [p for p in model.parameters() if p.requires_grad]
    F.cross_entropy(model(x), labels).backward()
    assert all(layer.delta.grad is not None and torch.isfinite(layer.delta.grad).all() for layer in layers.values())
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    torch.optim.Adam(trainable, lr=1e-2).step()
    with torch.no_grad():
        after = model(x).float()
    assert torch.isfinite(after).all() and not torch.allclose(after, base)
