"""Language model (embedding -> body -> head) with generation, and the encoder classifier."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from xvariants.config_errors import require
from xvariants.constants import IGNORE_INDEX
from xvariants.layers.init import init_gpt2
from xvariants.models.contract import AuxOutput, Body, BodyOutput, State
from xvariants.models.heads import InputEmbedding, LinearHead
from xvariants.modes import eval_modes


@dataclass
class LMOutput:
    """What :class:`LanguageModel` returns.

    ``logits`` ``[B, T, V]`` only when no targets are given (or ``return_logits=True``);
    ``nll`` ``[B, T]`` per-token loss in nats and ``loss`` its mean over scored tokens when
    targets are given; ``state``/``aux`` come from the body; ``hidden`` is the body output.
    """

    hidden: torch.Tensor
    state: State | None
    aux: AuxOutput
    logits: torch.Tensor | None = None
    nll: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    n_tokens: int = 0


class LanguageModel(nn.Module):
    """``embedding -> body -> head``, for every body that implements the contract.

    :param body: any :class:`~xvariants.models.contract.Body`.
    :param vocab_size: number of token ids.
    :param positions: absolute positions added to the embedding: ``learned``, ``sinusoidal``
        or ``none``; ``None`` picks ``none`` for bodies that own their positions, else ``learned``.
    :param max_len: longest sequence for learned positions.
    :param tie_embeddings: share the input embedding and output projection.
    :param emb_dropout: dropout on the embedding.
    :param embed_scale: scale token embeddings by sqrt(d_model).
    :param init_std: std of the N(0, std) embedding init.
    :param embedding: replace the input embedding (e.g. adaptive input).
    :param head: replace the output head (e.g. adaptive softmax); must offer ``logits`` and ``nll``.
    """

    def __init__(
        self,
        body: Body,
        vocab_size: int,
        *,
        positions: str | None = None,
        max_len: int = 1024,
        tie_embeddings: bool = True,
        emb_dropout: float = 0.0,
        embed_scale: bool = False,
        init_std: float = 0.02,
        embedding: nn.Module | None = None,
        head: nn.Module | None = None,
    ):
        super().__init__()
        require(isinstance(max_len, int) and not isinstance(max_len, bool) and max_len >= 1, "max_len", f"must be >= 1, got {max_len}")
        require(0.0 <= emb_dropout < 1.0, "emb_dropout", f"must be in [0, 1), got {emb_dropout}")
        if positions is None:
            positions = "none" if body.owns_positions else "learned"
        d = body.d_model
        self.vocab_size = vocab_size
        self.embed = embedding or InputEmbedding(
            vocab_size, d, positions=positions, max_len=max_len, dropout=emb_dropout, scale=embed_scale
        )
        if embedding is None:
            init_gpt2(self.embed, 1, std=init_std)
            if self.embed.pos is not None and hasattr(self.embed.pos, "weight"):
                nn.init.normal_(self.embed.pos.weight, std=init_std)
        self.body = body
        self.head = head or LinearHead(d, vocab_size)
        if head is None:
            if tie_embeddings:
                self.head.tie_to(self.embed)
            else:
                nn.init.normal_(self.head.weight, std=init_std)

    @property
    def max_context(self) -> int | None:
        """Longest input the embedding accepts (None: unbounded)."""
        return getattr(self.embed, "max_len", None)

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        state: State | None = None,
        *,
        padding_mask: torch.Tensor | None = None,
        cache=None,
        return_attention: bool = False,
        return_logits: bool = False,
    ) -> LMOutput:
        """:param tokens: ``[B, T]`` token ids.
        :param targets: ``[B, T]`` next-token ids (``-100`` = not scored) or None.
        :param state: recurrent state from the previous segment (stateful bodies).
        :param padding_mask: ``[B, T]`` True at padding.
        :param cache: decoding cache from ``body.new_cache()``.
        """
        out = self.hidden_states(tokens, state, padding_mask=padding_mask, cache=cache, return_attention=return_attention)
        result = LMOutput(hidden=out.hidden, state=out.state, aux=out.aux)
        if targets is not None:
            if targets.shape != tokens.shape:
                raise ValueError(f"targets {tuple(targets.shape)} must match tokens {tuple(tokens.shape)}")
            nll = self.head.nll(out.hidden, targets)
            n_scored = (targets != IGNORE_INDEX).sum()
            result.nll = nll
            result.loss = nll.sum() / n_scored.clamp(min=1)
            # the host sync comes last: under torch.compile the graph breaks after the loss
            result.n_tokens = int(n_scored)
        if targets is None or return_logits:
            result.logits = self.head.logits(out.hidden)
        return result

    def hidden_states(
        self,
        tokens: torch.Tensor,
        state: State | None = None,
        *,
        padding_mask: torch.Tensor | None = None,
        cache=None,
        return_attention: bool = False,
    ) -> BodyOutput:
        """``embedding -> body`` without the head: the body's ``hidden`` ``[B, T, D]``, ``state``
        and ``aux``. Arguments as for :meth:`forward`; a cache continues at its length."""
        offset = cache.length if cache is not None else 0
        h = self.embed(tokens, offset)
        return self.body(h, state, padding_mask=padding_mask, cache=cache, return_attention=return_attention)

    def nll_at(
        self,
        hidden: torch.Tensor,
        targets: torch.Tensor,
        rows: torch.Tensor | None = None,
        cols: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-token NLL (nats) of ``targets`` given ``hidden`` from :meth:`hidden_states`.

        With ``rows``/``cols`` only the positions ``[rows, cols]`` are scored (a 1-D result in
        their order), and the head forms logits only there: evaluation that scores a few
        positions of long windows does not pay for the full ``[B, T, V]`` logits.
        """
        if rows is None and cols is None:
            return self.head.nll(hidden, targets)
        return self.head.nll(hidden[rows, cols][None], targets[rows, cols][None])[0]

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        state: State | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` continuations of ``prompt`` ``[B, T0]``.

        Stateful bodies (Transformer-XL) read the prompt once and then feed one token at a
        time with their memory; bodies with a decoding cache feed one token at a time with
        cached keys/values; others recompute the (cropped) window each step.
        ``temperature=0`` is greedy decoding. Returns ``[B, T0 + max_new_tokens]``.
        """
        if prompt.dim() != 2 or prompt.size(1) == 0:
            raise ValueError(f"prompt must be [B, T0] with T0 >= 1, got {tuple(prompt.shape)}")
        with eval_modes(self):
            seq = prompt
            limit = self.max_context
            cache = None if self.body.stateful else self.body.new_cache()
            feed = prompt if limit is None else prompt[:, -limit:]
            for _ in range(max_new_tokens):
                if cache is not None and limit is not None and cache.length + feed.size(1) > limit:
                    # learned positions end here: restart the cache on the most recent window
                    cache, feed = self.body.new_cache(), seq[:, -limit:]
                out = self(feed, state=state, cache=cache)
                if self.body.stateful:
                    state = out.state
                nxt = sample_next(out.logits[:, -1], temperature, top_k, top_p, generator)
                seq = torch.cat([seq, nxt], dim=1)
                if self.body.stateful or cache is not None:
                    feed = nxt
                else:
                    feed = seq if limit is None else seq[:, -limit:]
            return seq


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one token per row from ``logits`` ``[B, V]``; returns ``[B, 1]``."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens ranked above it already cover top_p (the top token always stays)
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)


@dataclass
class ClassifierOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None
    aux: AuxOutput


class SequenceClassifier(nn.Module):
    """Bidirectional encoder with a pooled classification head.

    ``pooling='cls'`` reads position 0 (put a [CLS] token there); ``'mean'`` averages the
    non-padded positions.
    """

    def __init__(
        self,
        body: Body,
        vocab_size: int,
        n_classes: int,
        *,
        pooling: str = "cls",
        positions: str | None = None,
        max_len: int = 512,
        emb_dropout: float = 0.0,
    ):
        super().__init__()
        if body.causal:
            raise ValueError("SequenceClassifier needs a bidirectional body (causal=False)")
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        if positions is None:
            positions = "none" if body.owns_positions else "learned"
        self.pooling = pooling
        self.embed = InputEmbedding(vocab_size, body.d_model, positions=positions, max_len=max_len, dropout=emb_dropout)
        init_gpt2(self.embed, 1)
        self.body = body
        self.classifier = nn.Linear(body.d_model, n_classes)

    def forward(
        self,
        tokens: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        padding_mask: torch.Tensor | None = None,
        return_attention: bool = False,
    ) -> ClassifierOutput:
        out = self.body(self.embed(tokens), padding_mask=padding_mask, return_attention=return_attention)
        if self.pooling == "cls":
            pooled = out.hidden[:, 0]
        else:
            keep = torch.ones_like(tokens, dtype=out.hidden.dtype) if padding_mask is None else (~padding_mask).to(out.hidden.dtype)
            pooled = (out.hidden * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp(min=1)
        logits = self.classifier(pooled)
        loss = None if labels is None else F.cross_entropy(logits, labels) + out.aux.total_loss()
        return ClassifierOutput(logits, loss, out.aux)
