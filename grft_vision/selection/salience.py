"""Per-parameter importance scores beyond GRFT's squared gradient (SPEFT, ID3, GEM).

Every score is a tensor of the weight's shape; :mod:`grft_vision.selection.topk` then reduces it to rows,
columns or entries by summation, exactly as for GRFT's own score. ``g`` below is the summed gradient of
the selection loss over the chosen subset (the same pass GRFT uses), ``theta`` the weight:

==============  =======================================  ==================================================
``score``       formula                                  source
==============  =======================================  ==================================================
``grft``        ``g ** 2``                               GRFT Eq. 4 (default); per-row top-k = GPS's ``|g|``
``gradient``    ``|g|``                                  SPEFT "Gradient"
``magnitude``   ``|theta|``                              SPEFT (data-free)
``snip``        ``|g * theta|``                          SPEFT, SNIP
``force``       ``-g * theta``                           SPEFT, FORCE (signed)
``taylor_fo``   ``(g * theta) ** 2``                     SPEFT, Taylor first order
``synflow``     ``|dR/dtheta * theta|``, R = sum of the  SPEFT, SynFlow (data-free): all weights replaced
                network's output on an all-ones input    by their magnitudes, no data needed
``grasp``       ``-(H g) * theta``                       SPEFT, GraSP (Hessian-vector product over the data)
``fisher``      ``sum_n (dl_n/dtheta) ** 2``             SPEFT, Fisher (per-sample squared gradients)
``d3``          ``|g| / (|theta| + eps) ** exp``         ID3 Eq. 1 (``d3_eps``, ``d3_exp``)
``gem``         ``|g| / (|theta| + 1e-12)``              GEM's gradient-to-weight ratio
``random``      uniform in [0, 1)                        control (seeded by ``selection_seed``)
==============  =======================================  ==================================================
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from ..config import SCORES

__all__ = ["SCORES", "DATA_FREE_SCORES", "gradient_salience", "magnitude_scores", "random_scores",
           "synflow_scores"]

_GEM_EPS = 1e-12


def _grft(g: torch.Tensor, theta: torch.Tensor, eps: float, exp: float) -> torch.Tensor:
    return g.pow_(2)  # in place: the gradient buffer becomes the score, no second weight-sized tensor


_GRADIENT_FORMULAS: dict[str, Callable[[torch.Tensor, torch.Tensor, float, float], torch.Tensor]] = {
    "grft": _grft,
    "gradient": lambda g, theta, eps, exp: g.abs(),
    "snip": lambda g, theta, eps, exp: (g * theta).abs(),
    "force": lambda g, theta, eps, exp: -g * theta,
    "taylor_fo": lambda g, theta, eps, exp: (g * theta).pow(2),
    "d3": lambda g, theta, eps, exp: g.abs() / (theta.abs() + eps).pow(exp),
    "gem": lambda g, theta, eps, exp: g.abs() / (theta.abs() + _GEM_EPS),
}
DATA_FREE_SCORES = ("magnitude", "synflow", "random")
assert set(SCORES) == {*_GRADIENT_FORMULAS, "grasp", "fisher", *DATA_FREE_SCORES}


def gradient_salience(score: str, g: torch.Tensor, theta: torch.Tensor, *, d3_eps: float = 1.0,
                      d3_exp: float = 2.0) -> torch.Tensor:
    """A score computed from the summed gradient ``g`` and the weight ``theta`` (same shape), fp32.

    ``grft`` squares ``g`` in place; the other formulas leave it untouched.
    """
    return _GRADIENT_FORMULAS[score](g, theta.detach().float(), d3_eps, d3_exp)


def magnitude_scores(thetas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``|theta|`` of every weight."""
    return {name: theta.detach().float().abs() for name, theta in thetas.items()}


def random_scores(weights: dict[str, nn.Parameter], seed: int) -> dict[str, torch.Tensor]:
    """Uniform random scores (the control of a random selection at the same budget), seeded."""
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.rand(weight.shape, generator=generator).to(weight.device)
            for name, weight in weights.items()}


@torch.no_grad()
def _set_magnitudes(parameters: Iterable[nn.Parameter]) -> list[torch.Tensor]:
    signs = []
    for param in parameters:
        signs.append(param.sign())
        param.abs_()
    return signs


def synflow_scores(model: nn.Module, weights: dict[str, nn.Parameter],
                   input_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """SynFlow without data: ``|dR/dtheta * theta|`` with every parameter replaced by its magnitude.

    ``R`` is the sum of the model's output on one all-ones input of ``input_shape`` (without the batch
    dimension). The parameters' signs are restored afterwards (zeros stay zeros). The caller sets the mode
    and which parameters require grad.
    """
    parameters = list(model.parameters())
    signs = _set_magnitudes(parameters)
    try:
        reference = next(iter(weights.values()))
        ones = torch.ones((1, *input_shape), device=reference.device, dtype=reference.dtype)
        output = model(ones)
        output = output.logits if hasattr(output, "logits") else output
        torch.autograd.backward(output.sum())
        return {name: (weight.grad.float() * weight.detach().float()).abs() if weight.grad is not None
                else torch.zeros(weight.shape, device=weight.device) for name, weight in weights.items()}
    finally:
        with torch.no_grad():
            for param, sign in zip(parameters, signs):
                param.mul_(sign)
