"""The MLP as a key -> value memory (ROME's view), with the weight's orientation made explicit.

ROME and MEMIT edit the MLP's output projection ``W`` so that a key (the input of ``W``,
hook ``mlp.hook_post``) maps to a new value (the MLP output, hook ``hook_mlp_out``).
Modules store ``W`` in two layouts: ``nn.Linear`` as ``[out, in]`` = ``[d_model, d_mlp]``,
GPT-2's ``Conv1D`` as ``[in, out]`` = ``[d_mlp, d_model]``. :class:`MLPMemory` says which,
so an edit never guesses a transpose from the shapes (which fails silently when
``d_mlp == d_model``).

``mlp_memory(model, layer)`` works on the framework's models (``FeedForward.fc2``; the
Universal Transformer's shared block gives the same weight at every step) and on anything
with its own ``mlp_memory(layer)`` method (the Hugging Face adapter, ``hf_causal.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from xvariants.interpret.hooks import HookTable, act_name, unwrap_model


def linear_dims(module: nn.Module) -> tuple[int, int, bool] | None:
    """``(d_in, d_out, weight_is_in_out)`` of a linear map, or None for anything else.

    ``nn.Linear`` stores ``[out, in]``; a module whose 2-D weight is ``[in, nf]`` and which
    says ``nf`` (the Hugging Face ``Conv1D`` of GPT-2) stores ``[in, out]``.
    """
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    weight = getattr(module, "weight", None)
    nf = getattr(module, "nf", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and nf == weight.shape[1]:
        return weight.shape[0], weight.shape[1], True
    return None


def output_projection(mlp: nn.Module, d_model: int) -> tuple[str, nn.Module]:
    """``(name, module)`` of the MLP's output projection: the last linear child writing ``d_model``.

    "Last" matters when ``d_mlp == d_model``: the input projection comes first in every
    layout we know (``fc1/fc2``, ``c_fc/c_proj``, ``gate/up/down_proj``).
    """
    found = [(n, m) for n, m in mlp.named_children() if (dims := linear_dims(m)) is not None and dims[1] == d_model]
    if not found:
        raise ValueError(
            f"{type(mlp).__name__} has no linear child with output width {d_model}; cannot find its output projection"
        )
    return found[-1]


@dataclass(frozen=True)
class MLPMemory:
    """One layer's MLP read as a linear key -> value memory.

    :param layer: layer (or step) index.
    :param key_hook: canonical hook name of the key ``[..., d_mlp]`` (input of the projection).
    :param value_hook: canonical hook name of the value ``[..., d_model]`` (the MLP output).
    :param module: the output projection; its path is ``path``.
    :param weight: the projection's weight parameter, in the module's own layout.
    :param bias: its bias, or None.
    :param weight_is_in_out: True when ``weight`` is ``[d_mlp, d_model]`` (``Conv1D``), False
        when it is ``[d_model, d_mlp]`` (``nn.Linear``).
    :param path: module path of ``module`` in the model.
    :param shared: True when the weight serves several steps (Universal Transformer): an edit
        changes every step.
    """

    layer: int
    key_hook: str
    value_hook: str
    module: nn.Module = field(repr=False)
    weight: nn.Parameter = field(repr=False)
    bias: nn.Parameter | None = field(repr=False)
    weight_is_in_out: bool
    path: str
    shared: bool = False

    @property
    def d_mlp(self) -> int:
        return self.weight.shape[0 if self.weight_is_in_out else 1]

    @property
    def d_model(self) -> int:
        return self.weight.shape[1 if self.weight_is_in_out else 0]

    def w_out_in(self) -> torch.Tensor:
        """The weight as ``[d_model, d_mlp]`` (value = W @ key + bias): a view of the parameter."""
        return self.weight.t() if self.weight_is_in_out else self.weight

    def apply(self, key: torch.Tensor) -> torch.Tensor:
        """The value the projection writes for ``key`` ``[..., d_mlp]`` (before any dropout)."""
        out = key @ self.w_out_in().t()
        return out if self.bias is None else out + self.bias

    @torch.no_grad()
    def add_(self, delta_out_in: torch.Tensor) -> None:
        """Add ``delta_out_in`` ``[d_model, d_mlp]`` to the weight in place, in the module's layout."""
        if tuple(delta_out_in.shape) != (self.d_model, self.d_mlp):
            expected = (self.d_model, self.d_mlp)
            raise ValueError(f"update has shape {tuple(delta_out_in.shape)}, expected [d_model, d_mlp] = {expected}")
        self.w_out_in().add_(delta_out_in.to(self.weight))


def mlp_memory(model: nn.Module, layer: int) -> MLPMemory:
    """The :class:`MLPMemory` of ``layer`` in ``model`` (a framework model or the HF adapter)."""
    own = getattr(model, "mlp_memory", None)
    if callable(own):
        return own(layer)
    table = HookTable(model)
    key_site = table[act_name("post", layer, model)]
    value_hook = table.resolve(act_name("mlp_out", layer, model))
    mlp_path = key_site.path.rsplit(".", 1)[0]
    mlp = unwrap_model(model).get_submodule(mlp_path)
    d_model = getattr(table.body, "d_model", None)
    if d_model is None:
        raise ValueError("the model's body does not say its d_model")
    name, proj = output_projection(mlp, d_model)
    return MLPMemory(
        layer=layer,
        key_hook=key_site.name,
        value_hook=value_hook,
        module=proj,
        weight=proj.weight,
        bias=proj.bias,
        weight_is_in_out=linear_dims(proj)[2],
        path=f"{mlp_path}.{name}",
        shared=key_site.step is not None,
    )
