"""Resuming a forward pass at a layer: the fast path of causal tracing (:mod:`.patching`).

A cell that restores hook points of layer ``l`` (or of a window of layers starting at ``l``)
at token ``t`` leaves its rows equal to the plain corrupted run below layer ``l``, and, in a
decoder, at every position before ``t``. So the clean + corrupted batch runs once
(:meth:`Resumer.checkpoint`) keeping each layer's input and the attention keys/values, and a
pass over many cells (:meth:`Resumer.run_from_layer`)

* starts every row at its own first layer from the checkpoint's input there (rows are sorted
  by first layer and join the batch as the pass reaches it: one pass serves cells of every
  layer without recomputing anything below a row's first layer);
* computes positions ``t..T-1`` only, the earlier positions' keys/values coming from the
  checkpoint;
* forms logits at the last position only.

The hook points of the layers a pass runs fire as in a full forward, with activations
``[rows present, T - t, ...]``: at layer ``j`` the rows present are the first ``n_j`` rows of the
pass (those whose first layer is ``<= j``).

Which models: any model whose ``layer_resumer()`` returns a :class:`Resumer` (the Hugging Face
adapter, :mod:`.hf_resume`), and xvariants language models whose body can run one block on its
own with a key/value cache (``run_block``: the causal vanilla body). Other bodies (ACT halting,
segment memory) have none and take the plain path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from xvariants.interpret.hooks import unwrap_model


@dataclass
class LayerCheckpoint:
    """One full forward of a batch, kept for resuming it.

    :param logits: ``[B, V]`` at the last position.
    :param inputs: per layer, its input ``[B, T, D]`` (after any hook that patched it).
    :param kv: per layer, the attention's keys and values ``[B, H, T, Dh]`` as its cache holds them.
    """

    logits: torch.Tensor
    inputs: list[torch.Tensor]
    kv: list[tuple[torch.Tensor, torch.Tensor]]


class Resumer:
    """What a model offers to resume a forward at a layer; subclasses give the four steps."""

    n_layers: int

    def checkpoint(self, tokens: torch.Tensor) -> LayerCheckpoint:
        """Run ``tokens`` ``[B, T]`` through the whole model (every hook point fires)."""
        raise NotImplementedError

    def begin(self, ckpt: LayerCheckpoint, rows_at: list[torch.Tensor], token: int):
        """Per-pass state: caches holding ``ckpt``'s keys/values of positions ``< token`` for
        the rows ``rows_at[j]`` present at each layer ``j``."""
        raise NotImplementedError

    def layer(self, j: int, h: torch.Tensor, state) -> torch.Tensor:
        """Layer ``j`` on ``h`` ``[n_j, T - token, D]`` (its hook points fire)."""
        raise NotImplementedError

    def logits(self, h_last: torch.Tensor) -> torch.Tensor:
        """Final norm and unembedding of the last layer's output at one position ``[B, D]``."""
        raise NotImplementedError

    @torch.no_grad()
    def run_from_layer(self, ckpt: LayerCheckpoint, rows: torch.Tensor, first: torch.Tensor, token: int) -> torch.Tensor:
        """Logits ``[len(rows), V]`` at the last position.

        :param rows: row of ``ckpt``'s batch each output row starts from.
        :param first: first layer each row recomputes, non-decreasing; ``n_layers`` = none (the
            checkpoint's logits are returned for that row).
        :param token: first position recomputed; earlier ones keep the checkpoint's keys/values.
        """
        L = self.n_layers
        if first.numel() != rows.numel() or (first.numel() > 1 and bool((first[1:] < first[:-1]).any())):
            raise ValueError("first: one non-decreasing start layer per row")
        out = ckpt.logits[rows].clone()
        counts = [int((first <= j).sum()) for j in range(L)]
        if not counts or counts[-1] == 0:
            return out
        rows_at = [rows[:n] for n in counts]
        state = self.begin(ckpt, rows_at, token)
        h, have = None, 0
        for j in range(int(first[0]), L):
            if counts[j] > have:  # rows whose first layer is j join with the checkpoint's input
                new = ckpt.inputs[j][rows[have : counts[j]], token:]
                h = new if h is None else torch.cat([h, new])
                have = counts[j]
            h = self.layer(j, h, state)
        out[:have] = self.logits(h[:, -1])
        return out


def _prefix(t: torch.Tensor, rows: torch.Tensor, token: int) -> torch.Tensor:
    return t[rows, :, :token]


class BodyResumer(Resumer):
    """For an xvariants language model whose causal body offers ``run_block(i, h, kv_cache)``
    (and ``ln_f``); the embedding (with its absolute positions) runs in the checkpoint only."""

    def __init__(self, model: nn.Module):
        self.model, self.body = model, model.body
        self.n_layers = len(self.body.blocks)

    def checkpoint(self, tokens: torch.Tensor) -> LayerCheckpoint:
        from xvariants.layers.attention import KVCache

        h = self.model.embed(tokens, 0)
        inputs, kv = [], []
        for j in range(self.n_layers):
            inputs.append(h)
            cache = KVCache()
            h = self.body.run_block(j, h, cache)
            kv.append((cache.k, cache.v))
        return LayerCheckpoint(self.logits(h[:, -1]), inputs, kv)

    def begin(self, ckpt, rows_at, token):
        from xvariants.layers.attention import KVCache

        caches = []
        for (k, v), rows in zip(ckpt.kv, rows_at):
            cache = KVCache()
            if token > 0:
                cache.append(_prefix(k, rows, token), _prefix(v, rows, token))
            caches.append(cache)
        return caches

    def layer(self, j, h, state):
        return self.body.run_block(j, h, state[j])

    def logits(self, h_last):
        return self.model.head.logits(self.body.ln_f(h_last))


def layer_resumer(model: nn.Module) -> Resumer | None:
    """The model's :class:`Resumer`, or None when it cannot resume at a layer."""
    model = unwrap_model(model)
    own = getattr(model, "layer_resumer", None)
    if callable(own):
        return own()
    body = getattr(model, "body", None)
    if (callable(getattr(body, "run_block", None)) and getattr(body, "causal", False)
            and hasattr(model, "embed") and hasattr(model, "head")):
        return BodyResumer(model)
    return None
