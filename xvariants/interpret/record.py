"""The input of every attention-flow method: per-layer (per-step) attention of one sequence.

An :class:`AttentionRecord` is plain data (numpy), so hand-built attention, an xvariants model
(:func:`record_attention`) and a Hugging Face encoder (:mod:`xvariants.interpret.hf`) all feed
the same trace / rollout / max-flow / views.

Levels: level 0 is the input (embeddings); layer ``l`` (1-based) maps level ``l-1`` to level
``l``. ``attn[l-1]`` is ``[H, T, M_l + T]``: queries are the ``T`` current positions, the first
``M_l`` keys are Transformer-XL memory (the cached inputs of layer ``l``, i.e. level ``l-1``
states of earlier positions). Memory positions are leaves of the graph: their own attention
was computed in an earlier segment. ``active[l-1]`` (Universal Transformer with ACT) marks
the positions updated by step ``l``; the others were halted and their state was copied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from xvariants.interpret.hooks import HookTable, find_body, run_with_cache, unwrap_model
from xvariants.modes import eval_modes

#: hook names of a body that applies one shared layer step after step (Universal Transformers)
STEP_PREFIX = "steps."


@dataclass
class AttentionRecord:
    """Attention probabilities of one sequence through every layer or step.

    :param tokens: labels of the ``T`` current positions.
    :param attn: per layer, ``[H, T, M + T]`` float arrays (rows sum to 1 over allowed keys).
    :param active: per layer, ``[T]`` bool (False = halted, state copied) or None (all active).
    :param memory_tokens: labels of memory positions (oldest first), if known; the memory of
        every layer covers the same ``M`` most recent past positions.
    :param causal: decoder (True: trace from the last token by default) or encoder ([CLS]).
    :param kind: ``vanilla``, ``universal``, ``xl``, ``hf`` or ``manual``.
    :param name: model label for views and comparisons.
    :param freeze_halted: halted positions are copied (UT ``halted_update="freeze"``); under
        tensor2tensor's update they keep being transformed, so their rows stay attention rows.
    :param layer_word: what a level is called in views: ``step`` when one shared layer is
        applied repeatedly (the body's hooks are named ``steps.{n}.``), else ``layer``.
    """

    tokens: list[str]
    attn: list[np.ndarray]
    active: list[np.ndarray | None] | None = None
    memory_tokens: list[str] | None = None
    causal: bool = True
    kind: str = "manual"
    name: str = "model"
    freeze_halted: bool = True
    meta: dict[str, Any] = field(default_factory=dict)
    layer_word: str = "layer"

    def __post_init__(self) -> None:
        self.attn = [np.asarray(a, dtype=np.float64) for a in self.attn]
        T = len(self.tokens)
        if not self.attn:
            raise ValueError("an attention record needs at least one layer")
        for i, a in enumerate(self.attn):
            if a.ndim == 2:
                a = a[None]
                self.attn[i] = a
            if a.ndim != 3 or a.shape[1] != T or a.shape[2] < T:
                raise ValueError(f"layer {i + 1}: attention must be [H, T={T}, M + T], got {a.shape}")
        if self.active is None:
            self.active = [None] * len(self.attn)
        if len(self.active) != len(self.attn):
            raise ValueError(f"active has {len(self.active)} entries for {len(self.attn)} layers")
        self.active = [None if m is None else np.asarray(m, dtype=bool).reshape(T) for m in self.active]

    # ------------------------------------------------------------------ shape
    @property
    def n_layers(self) -> int:
        return len(self.attn)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def n_heads(self, layer: int | None = None) -> int:
        """Heads of ``layer`` (1-based), or the largest count."""
        if layer is None:
            return max(a.shape[0] for a in self.attn)
        return self.attn[layer - 1].shape[0]

    def n_memory(self, layer: int) -> int:
        """Memory keys of ``layer`` (1-based)."""
        return self.attn[layer - 1].shape[2] - self.n_tokens

    def is_active(self, layer: int, pos: int) -> bool:
        if not 1 <= layer <= self.n_layers:
            return True
        m = self.active[layer - 1]
        return True if m is None else bool(m[pos])

    def copies(self, layer: int, pos: int) -> bool:
        """True when position ``pos`` was halted at ``layer`` and its state only copied."""
        return self.freeze_halted and not self.is_active(layer, pos)

    def default_start(self) -> int:
        """[CLS] (position 0) for encoders, the last token for decoders."""
        return self.n_tokens - 1 if self.causal else 0

    def memory_label(self, j: int, layer: int) -> str:
        """Label of memory key ``j`` (0-based, oldest first) of ``layer``."""
        M = self.n_memory(layer)
        if self.memory_tokens is not None and len(self.memory_tokens) >= M:
            return self.memory_tokens[len(self.memory_tokens) - M + j]
        return f"mem{j - M}"

    def merged(self, layer: int, heads=None) -> np.ndarray:
        """Mean over the selected heads of ``layer`` (1-based): ``[T, M + T]``."""
        a = self.attn[layer - 1]
        idx = _head_index(heads, a.shape[0], layer)
        if len(idx) == 0:
            return np.zeros(a.shape[1:])
        return a[idx].mean(axis=0)

    def to_dict(self, decimals: int = 4) -> dict:
        """JSON-safe description (views embed it)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "causal": self.causal,
            "tokens": list(self.tokens),
            "memory_tokens": self.memory_tokens,
            "freeze_halted": self.freeze_halted,
            "layer_word": self.layer_word,
            "layers": [
                {
                    "n_memory": self.n_memory(l + 1),
                    "attn": np.round(a, decimals).tolist(),
                    "active": None if m is None else m.astype(int).tolist(),
                }
                for l, (a, m) in enumerate(zip(self.attn, self.active))
            ],
        }


def _head_index(heads, n_heads: int, layer: int) -> list[int]:
    """Selected heads of one layer: None = all; a list of ints = those heads in every layer;
    a dict ``{layer: [heads]}`` = per layer (layers missing from it keep all heads)."""
    if heads is None or heads == "all":
        return list(range(n_heads))
    if isinstance(heads, dict):
        sel = heads.get(layer)
        return list(range(n_heads)) if sel is None else [h for h in sel if 0 <= h < n_heads]
    return [h for h in heads if 0 <= h < n_heads]


# ---------------------------------------------------------------------- from a model
def _labels(tokenizer, ids: list[int]) -> list[str]:
    if tokenizer is None:
        return [str(i) for i in ids]
    out = []
    for i in ids:
        try:
            s = tokenizer.decode([i])
        except Exception:  # noqa: BLE001 - a label is cosmetic
            s = str(i)
        out.append(s if s.strip() else repr(s)[1:-1] or "␣")
    return out


@torch.no_grad()
def record_attention(
    model: nn.Module,
    tokens,
    *,
    tokenizer=None,
    state=None,
    memory_tokens: list[str] | None = None,
    name: str = "model",
    labels: list[str] | None = None,
    fwd_hooks=(),
) -> AttentionRecord:
    """Run an xvariants model on one sequence and record every layer's (step's) attention.

    :param tokens: ``[T]`` or ``[1, T]`` token ids.
    :param tokenizer: used for token labels (``decode([id])``).
    :param state: Transformer-XL memory from earlier segments (its keys become memory leaves).
    :param memory_tokens: labels of the positions held in memory (oldest first).
    :param fwd_hooks: hooks active during the run (e.g. a patch whose attention you want to see).
    Halted positions of a UT with ACT are read from ``steps.{n}.hook_active``.
    """
    net = unwrap_model(model)
    body = find_body(net)
    tokens = torch.as_tensor(tokens)
    if tokens.dim() == 1:
        tokens = tokens[None]
    if tokens.dim() != 2 or tokens.size(0) != 1:
        raise ValueError(f"attention flow analyses one sequence: tokens must be [T] or [1, T], got {tuple(tokens.shape)}")
    device = next(net.parameters()).device
    tokens = tokens.to(device)
    table = HookTable(net)
    wanted = [n for n in table if n.endswith("attn.hook_pattern") or n.endswith(".hook_active")]
    kwargs = {"state": state} if state is not None else {}
    with eval_modes(net):
        _, cache = run_with_cache(net, tokens, wanted, device="cpu", fwd_hooks=fwd_hooks, **kwargs)
    patterns = sorted((cache.meta[n]["step"], n) for n in cache if n.endswith("attn.hook_pattern"))
    if not patterns:
        raise RuntimeError("no attention pattern fired: is this an xvariants model with attention hook points?")
    attn = [cache[n][0].double().numpy() for _, n in patterns]
    active = []
    for step, _ in patterns:
        key = f"{STEP_PREFIX}{step}.hook_active"
        active.append(cache[key][0].numpy().astype(bool) if key in cache else None)
    kind = getattr(type(body), "registry_name", "model") if body is not None else "model"
    # a body that repeats one shared layer names its hooks by step (``steps.{n}.``), whatever the body
    word = "step" if all(n.startswith(STEP_PREFIX) for _, n in patterns) else "layer"
    freeze = True
    halting = getattr(body, "halting", None)
    if halting is not None:
        freeze = getattr(halting, "halted_update", "freeze") == "freeze"
    ids = tokens[0].tolist()
    return AttentionRecord(
        tokens=labels or _labels(tokenizer, ids),
        attn=attn,
        active=active,
        memory_tokens=memory_tokens,
        causal=bool(getattr(body, "causal", True)),
        kind=kind,
        name=name,
        freeze_halted=freeze,
        meta={"token_ids": ids},
        layer_word=word,
    )
