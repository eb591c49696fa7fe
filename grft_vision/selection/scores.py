"""Per-parameter importance scores, and the registry that names them (GRFT's, SPEFT's, ID3's, GEM's).

Every score maps the targeted weights to tensors of their shapes; a structure then reduces them to rows,
columns or entries by summation (:meth:`Update.unit_scores <grft_vision.tuner.structures.Update.unit_scores>`).
``g`` below is the summed gradient of the selection loss over the chosen subset (the pass GRFT uses),
``theta`` the weight:

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

A score is a :class:`Score` registered in :data:`SCORES`; it computes from a :class:`ScoreInputs` — the
weights and their values, and on demand the summed gradient, per-sample squared gradients, a
Hessian-vector product over the selection data, or the model itself. Add one from your own code::

    from grft_vision.selection.scores import GradientScore, register_score

    register_score(GradientScore("g_times_theta2", lambda g, theta, options: (g * theta.pow(2)).abs()))

and ``GRFTConfig(score="g_times_theta2")`` uses it everywhere.
"""
from __future__ import annotations

from typing import Callable, Iterable, Protocol

import torch
from torch import nn

from ..registry import Registry

__all__ = ["Score", "GradientScore", "ScoreInputs", "SCORES", "register_score", "data_free_scores",
           "synflow_scores"]

_GEM_EPS = 1e-12


class ScoreInputs(Protocol):
    """What a score may read (:class:`grft_vision.selection.gradients.ScoreRun` provides it).

    Attributes:
        model: the model being scored (its mode and ``requires_grad`` are set for the pass).
        weights: the targeted weights by layer name (the parameters gradients are taken of).
        thetas: the values the scores use, by layer name (the effective weights the model computes with).
        options: the :class:`~grft_vision.config.SelectionConfig` (``seed``, ``d3_eps``, ``d3_exp``, ...).
    """

    model: nn.Module
    weights: dict[str, nn.Parameter]
    thetas: dict[str, torch.Tensor]
    options: object

    def gradient_sums(self) -> dict[str, torch.Tensor]:
        """``g``: the sum of per-batch mean-loss gradients of every weight over the chosen subset, fp32."""

    def per_sample_squares(self) -> dict[str, torch.Tensor]:
        """``sum_n (dl_n / dtheta) ** 2`` over every sample of the chosen subset, fp32."""

    def hessian_times(self, vector: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``H v`` with H the Hessian of the summed selection loss over the chosen subset."""

    def input_shape(self) -> tuple[int, ...]:
        """``[C, H, W]`` of one input (data-free scores that run the model)."""


class Score:
    """One importance score.

    Args:
        name: its registry name (the value of ``GRFTConfig.score``).
        needs_data: True when it reads the selection data (the gradient pass); False for data-free scores.

    Attributes:
        quantized_limit: why the score cannot score a quantized (bitsandbytes) layer, or None when it can: a
            quantized layer's gradient comes from a probe (:mod:`.probes`), its ``theta`` is dequantized.
    """

    quantized_limit: str | None = None

    def __init__(self, name: str, needs_data: bool = True) -> None:
        self.name, self.needs_data = name, needs_data

    @property
    def supports_quantized(self) -> bool:
        return self.quantized_limit is None

    def compute(self, inputs: ScoreInputs) -> dict[str, torch.Tensor]:
        """``{layer name: score of the weight's shape}`` for every targeted weight."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


GradientFormula = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


class GradientScore(Score):
    """A score computed elementwise from the summed gradient ``g`` and the weight ``theta`` (same shape).

    Args:
        name: the registry name.
        formula: ``(g, theta, options) -> score`` (fp32; ``options`` is the selection config). It may reuse
            ``g``'s memory (GRFT's square is in place): ``g`` is not read again.
    """

    def __init__(self, name: str, formula: GradientFormula) -> None:
        super().__init__(name)
        self.formula = formula

    def compute(self, inputs: ScoreInputs) -> dict[str, torch.Tensor]:
        sums = inputs.gradient_sums()
        return {name: self.formula(sums[name], inputs.thetas[name].detach().float(), inputs.options)
                for name in inputs.weights}


class _Fisher(Score):
    def compute(self, inputs: ScoreInputs) -> dict[str, torch.Tensor]:
        return inputs.per_sample_squares()


class _GraSP(Score):
    quantized_limit = "its Hessian-vector product needs a second derivative through bitsandbytes' matmul, which has none."

    def compute(self, inputs: ScoreInputs) -> dict[str, torch.Tensor]:
        product = inputs.hessian_times(inputs.gradient_sums())
        return {name: -product[name] * inputs.thetas[name].float() for name in inputs.weights}


class _Magnitude(Score):
    def compute(self, inputs: ScoreInputs) -> dict[str, torch.Tensor]:
        return {name: theta.detach().float().abs() for name, theta in inputs.thetas.items()}


class _Random(Score):
    """Uniform random scores (the control of a random selection at the same budget), seeded by ``seed``."""

    def compute(self, inputs: ScoreInputs) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(inputs.options.seed)
        return {name: torch.rand(weight.shape, generator=generator).to(weight.device)
                for name, weight in inputs.weights.items()}


class _SynFlow(Score):
    quantized_limit = "it replaces every weight by its magnitude, which a quantized weight cannot take."

    def compute(self, inputs: ScoreInputs) -> dict[str, torch.Tensor]:
        return synflow_scores(inputs.model, inputs.weights, inputs.input_shape())


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


SCORES: Registry[Score] = Registry("score")


def register_score(score: Score, *, replace: bool = False) -> Score:
    """Add ``score`` to :data:`SCORES` under ``score.name``; returns it.

    Raises:
        ConfigError: the name is taken (``replace=True`` replaces on purpose).
    """
    SCORES.register(score.name, score, replace=replace)
    return score


for _score in (
    GradientScore("grft", lambda g, theta, options: g.pow_(2)),  # in place: the gradient buffer becomes the score
    GradientScore("gradient", lambda g, theta, options: g.abs()),
    _Magnitude("magnitude", needs_data=False),
    GradientScore("snip", lambda g, theta, options: (g * theta).abs()),
    GradientScore("force", lambda g, theta, options: -g * theta),
    GradientScore("taylor_fo", lambda g, theta, options: (g * theta).pow(2)),
    _SynFlow("synflow", needs_data=False),
    _GraSP("grasp"),
    _Fisher("fisher"),
    GradientScore("d3", lambda g, theta, options: g.abs() / (theta.abs() + options.d3_eps).pow(options.d3_exp)),
    GradientScore("gem", lambda g, theta, options: g.abs() / (theta.abs() + _GEM_EPS)),
    _Random("random", needs_data=False),
):
    register_score(_score)



def data_free_scores() -> tuple[str, ...]:
    """The names of the registered scores that need no data."""
    return tuple(name for name, score in SCORES.items() if not score.needs_data)

