"""The one contract every body implements.

A language model is ``token embedding -> body -> output head``. A *body* maps hidden
states ``[B, T, D]`` plus an optional recurrent state to new hidden states, the next state
and an auxiliary output. The training loop relies on nothing else, so it never asks which
variant it is running:

* it adds every tensor in ``aux.losses`` to the objective (they are already weighted),
* it logs every scalar in ``aux.stats``,
* it carries ``state`` to the next batch of the same streams, detached.

A ``State`` is a nest of lists/tuples/dicts of tensors, so a checkpoint can store it and
``torch.load(weights_only=True)`` can read it back; stateless bodies return ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import nn

from xvariants.layers.attention import DecodingCache

State = Union[list, tuple, dict, torch.Tensor]


@dataclass
class AuxOutput:
    """What a body reports besides hidden states.

    :param losses: extra objective terms, already weighted (e.g. ``ponder_cost``).
    :param stats: scalar statistics for logging (e.g. ``ponder_steps_mean``).
    :param maps: per-position diagnostics ``[B, T]`` (e.g. ``n_updates``, ``remainders``).
    :param attentions: per layer (or per step) attention probabilities ``[B, H, T, S]``,
        only when ``return_attention=True`` was asked for.
    """

    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    attentions: list[torch.Tensor] | None = None

    def total_loss(self) -> torch.Tensor | float:
        """Sum of the extra loss terms (0.0 when there are none)."""
        return sum(self.losses.values()) if self.losses else 0.0


@dataclass
class BodyOutput:
    """Result of ``Body.forward``: hidden states ``[B, T, D]``, the next state, aux outputs."""

    hidden: torch.Tensor
    state: State | None
    aux: AuxOutput


class Body(nn.Module):
    """Base class of all bodies (vanilla, universal, XL, ...).

    Subclasses set ``d_model`` and ``causal`` and implement :meth:`forward`. Two optional
    capabilities, each with a safe default:

    * :meth:`new_cache` returns a :class:`DecodingCache` when the body supports incremental
      decoding with cached keys/values (generation then feeds one token at a time);
    * ``stateful = True`` means the returned state carries context forward (Transformer-XL
      memory); generation then feeds new tokens with the state instead of recomputing.
    """

    d_model: int
    causal: bool
    stateful: bool = False
    #: the body adds its own position information (relative attention, per-step signals),
    #: so the embedding should not add absolute positions unless asked to.
    owns_positions: bool = False

    def forward(
        self,
        h: torch.Tensor,
        state: State | None = None,
        *,
        padding_mask: torch.Tensor | None = None,
        cache: DecodingCache | None = None,
        return_attention: bool = False,
    ) -> BodyOutput:
        """:param h: hidden states ``[B, T, D]``.
        :param state: recurrent state from the previous segment of the same streams, or None.
        :param padding_mask: ``[B, T]`` (``[B, cached + T]`` with a cache), True at padding.
        :param cache: decoding cache from :meth:`new_cache`, extended in place.
        :param return_attention: put attention probabilities into ``aux.attentions``.
        """
        raise NotImplementedError

    def new_cache(self) -> DecodingCache | None:
        """A fresh decoding cache, or None when the body cannot decode incrementally."""
        return None

    def init_state(self, batch_size: int, device: torch.device) -> State | None:
        """The state to start a stream with (None for stateless bodies)."""
        return None


def _is_dataclass_instance(x: Any) -> bool:
    return hasattr(x, "__dataclass_fields__") and not isinstance(x, type)


def map_state(state: Any, fn) -> Any:
    """Apply ``fn`` to every tensor in a state nest (lists, tuples, dicts)."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, (list, tuple)):
        return type(state)(map_state(s, fn) for s in state)
    if isinstance(state, dict):
        return {k: map_state(v, fn) for k, v in state.items()}
    raise TypeError(
        f"body state must be tensors nested in lists/tuples/dicts (checkpoint-safe), got {type(state).__name__}"
    )


def detach_state(state: Any) -> Any:
    """Cut the autograd graph between segments (truncated backprop through time)."""
    return map_state(state, lambda t: t.detach())
