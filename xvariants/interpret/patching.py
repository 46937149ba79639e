"""Batched corrupt-and-restore runs: the engine under causal tracing (:mod:`.causal_trace`).

One forward pass holds row 0 = the clean prompt and, for each *cell* (a set of activations to
restore at one token), ``samples`` corrupted rows: Gaussian noise on the token embeddings of
the subject (``hook_embed``; position embeddings stay clean), the same noise for every cell.
A cell restores hook points at its token to row 0's value (``h[rows, t] = h[0, t]``, as the
ROME code does) and may *freeze* others to the values a plain corrupted run recorded there
(the severed experiment). Many cells share one pass (rows = 1 + samples x cells), so a whole
trace costs a few large forward passes instead of one small pass per (token, layer).

Everything goes through the hook API (:func:`~xvariants.interpret.hooks.hooks`); the sites are
found in the model's hook table by capability (``{blocks|steps}.{l}.hook_resid_post`` /
``hook_mlp_out`` / ``hook_attn_out``, ``hook_embed``), not by body name. Rows never mix: every
body computes each row on its own, and the universal bodies halt per position. One body
computes some steps on a subset of rows (universal_xl skips rows whose positions have all
halted); its block-internal points then fire with fewer rows, and the ``steps.{n}.hook_active``
mask of that step says which (the body's rule: rows with a running position).

Fast path: on a model that can resume a forward at a layer (:mod:`.resume`: the Hugging Face
adapter, the vanilla body), the clean and corrupted rows run once and each pass starts every
cell's rows at the first layer and token the cell restores, with logits at the last position
only; ``fast=False`` runs every pass through the whole model (the reference it is tested against).
"""

from __future__ import annotations

import re
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from xvariants.interpret.hooks import HookTable, hooks, unwrap_model
from xvariants.interpret.patch_hooks import act_rows, patch, prefix_rows, recorder, remember
from xvariants.interpret.resume import LayerCheckpoint, layer_resumer

#: trace kinds -> the per-layer (per-step) hook point they restore
KIND_POINTS = {"resid": "hook_resid_post", "mlp": "hook_mlp_out", "attn": "hook_attn_out"}
_SITE = re.compile(r"^(?:blocks|steps)\.(\d+)\.(hook_resid_post|hook_mlp_out|hook_attn_out|hook_active)$")


@dataclass(frozen=True)
class TraceSites:
    """Where a model can be corrupted and restored.

    :param embed: the token-embedding point (``hook_embed``).
    :param names: kind (``resid``, ``mlp``, ``attn``) -> canonical hook name per layer/step;
        a kind the model does not have is absent.
    :param active: ``steps.{n}.hook_active`` per step (ACT bodies), else empty.
    """

    embed: str
    names: dict[str, tuple[str, ...]]
    active: tuple[str, ...] = ()

    @property
    def n_layers(self) -> int:
        return len(self.names["resid"])

    def window(self, kind: str, layer: int, window: int) -> tuple[str, ...]:
        """The names restored by a cell centred on ``layer``: one for ``resid``; for ``mlp`` /
        ``attn`` layers ``layer - window//2 .. layer + ceil(window/2) - 1``, clipped (ROME)."""
        names = self.names[kind]
        if kind == "resid":
            return (names[layer],)
        lo, hi = window_bounds(layer, window, len(names))
        return names[lo:hi]


def window_bounds(layer: int, window: int, n_layers: int) -> tuple[int, int]:
    """``[lo, hi)`` of the window centred on ``layer`` (l-5..l+4 for the default 10)."""
    return max(0, layer - window // 2), min(n_layers, layer - (-window // 2))


def trace_sites(model: nn.Module) -> TraceSites:
    """Find the token embedding and the per-layer residual / MLP / attention outputs in the
    model's hook table; ValueError when the model lacks the embedding or residual points."""
    table = HookTable(model)
    found: dict[str, dict[int, str]] = defaultdict(dict)
    for name in table:
        m = _SITE.match(name)
        if m:
            found[m.group(2)][int(m.group(1))] = name
    if "hook_embed" not in table:
        raise ValueError("model: no 'hook_embed' hook point (the token embedding the noise goes on)")
    names = {}
    for kind, point in KIND_POINTS.items():
        layers = found.get(point, {})
        if layers:
            if sorted(layers) != list(range(len(layers))):
                raise ValueError(f"model: {point} points are not numbered 0..n-1: {sorted(layers)}")
            names[kind] = tuple(layers[i] for i in range(len(layers)))
    if "resid" not in names:
        raise ValueError("model: no '{blocks|steps}.{l}.hook_resid_post' hook points to restore")
    active = found.get("hook_active", {})
    return TraceSites(table.resolve("hook_embed"), names, tuple(active[i] for i in sorted(active)))


@dataclass(frozen=True)
class Cell:
    """One intervention on ``samples`` corrupted rows, at one token.

    :param token: position of the restored / frozen activations (or a tuple of positions).
    :param restore: hook names set to the clean row's value at ``token``.
    :param freeze: hook names set to the plain corrupted run's value at ``token`` (needs
        ``frozen`` values from :meth:`Patcher.run` with ``record``).
    No names = the plain corrupted run.
    """

    token: int | tuple[int, ...]
    restore: tuple[str, ...] = ()
    freeze: tuple[str, ...] = ()


CORRUPTED = Cell(0)


@dataclass
class PatchRun:
    """What :meth:`Patcher.run` returns.

    ``clean`` ``[V]`` (``[T, V]`` with all positions) the clean row's distribution (or
    ``[1]``, its probability of ``answer``); ``probs`` ``[cells, samples, ...]`` the same for
    each corrupted row; ``n_updates`` ``[T]`` / ``[cells, samples, T]`` ACT steps per position
    (None without ACT); ``recorded`` name -> ``[samples, T, D]`` corrupted values (NaN where
    a row did not run that step).
    """

    clean: torch.Tensor
    probs: torch.Tensor
    clean_n_updates: torch.Tensor | None
    n_updates: torch.Tensor | None
    recorded: dict[str, torch.Tensor]


def lm_logits(model: nn.Module, batch: torch.Tensor, all_positions: bool, state=None):
    """``(logits [B, V] at the last position or [B, T, V], aux maps)``; xvariants language
    models form logits only where they are read. ``state``: memory of a previous segment."""
    if hasattr(model, "hidden_states") and hasattr(model, "head"):
        out = model.hidden_states(batch, state)
        hidden = out.hidden if all_positions else out.hidden[:, -1]
        return model.head.logits(hidden), out.aux.maps
    out = model(batch) if state is None else model(batch, state=state)
    logits = getattr(out, "logits", out)
    aux = getattr(out, "aux", None)
    return (logits if all_positions else logits[:, -1]), (getattr(aux, "maps", None) or {})


def draw_noise(std: float, samples: int, n_tokens: int, width: int, seed: int) -> torch.Tensor:
    """``[samples, n_tokens, width]`` N(0, std^2) from a generator seeded with ``seed`` (ROME
    reseeds per call: every cell, and every fact with as many subject tokens, gets this draw)."""
    g = torch.Generator().manual_seed(seed)
    return std * torch.randn(samples, n_tokens, width, generator=g, dtype=torch.float64)


class Patcher:
    """Runs cells of one prompt in batches.

    :param model: a language model with the hook points of :func:`trace_sites`.
    :param tokens: the prompt ``[T]``.
    :param subject: ``(start, end)`` token range that gets the noise.
    :param noise: std of the Gaussian noise, or a ``[samples, end - start, D]`` tensor to add.
    :param samples: corrupted rows per cell (with a std).
    :param seed: seed of the noise draw (with a std): one draw, reused by every cell and pass.
    :param batch_rows: most rows per forward pass (at least one cell always goes in).
    :param fast: resume passes at each cell's first layer when the model can
        (:mod:`.resume`); False = every pass runs the whole model (the reference path).
    """

    def __init__(self, model: nn.Module, tokens: torch.Tensor, subject: tuple[int, int], noise: float | torch.Tensor,
                 *, samples: int = 10, seed: int = 1, sites: TraceSites | None = None, batch_rows: int = 1024,
                 fast: bool = True):
        self.model = unwrap_model(model)
        self.tokens, self.subject = tokens.to(next(self.model.parameters()).device), subject
        self.level, self.seed = noise, seed
        self.noise = noise if isinstance(noise, torch.Tensor) else None
        self.samples = noise.size(0) if isinstance(noise, torch.Tensor) else samples
        self.sites = sites or trace_sites(model)
        self.per_pass = max(1, (batch_rows - 1) // self.samples)
        self.table = HookTable(self.model)
        self.resumer = layer_resumer(self.model) if fast else None
        self._checkpoint: LayerCheckpoint | None = None

    @property
    def resumes(self) -> bool:
        """Whether :meth:`run` takes the resumed (fast) path where it can."""
        return self.resumer is not None

    @torch.no_grad()
    def run(self, cells: Sequence[Cell], *, answer: int | None = None, all_positions: bool = False,
            record: Sequence[str] = (), frozen: dict[str, torch.Tensor] | None = None) -> PatchRun:
        """Run ``cells`` (chunked), returning the distributions at the last position (every
        position with ``all_positions``), or only the probability of ``answer``; ``record``
        names are kept from the rows of the first cell (use with :data:`CORRUPTED`)."""
        if self.resumer is not None and not all_positions and not record:
            starts = [self._start(cell) for cell in cells]
            if _PLAIN not in starts and self._resume_checkpoint() is not None:
                return self._run_resumed(cells, starts, answer, frozen or {})
        cleans, probs, ups, recorded = [], [], [], {}
        clean_up = None
        for i in range(0, len(cells), self.per_pass):
            chunk = cells[i : i + self.per_pass]
            logits, maps, rec = self._pass(chunk, record if i == 0 else (), frozen or {}, all_positions)
            p = _probs(logits, answer)
            cleans.append(p[0])
            probs.append(p[1:].reshape(len(chunk), self.samples, *p.shape[1:]))
            recorded.update(rec)
            n = maps.get("n_updates")
            if n is not None:
                clean_up = n[0] if clean_up is None else clean_up
                ups.append(n[1:].reshape(len(chunk), self.samples, -1))
        return PatchRun(cleans[0], torch.cat(probs), clean_up, torch.cat(ups) if ups else None, recorded)

    # ------------------------------------------------------------------ one full pass
    def _corrupt(self, n_cells: int):
        s0, s1 = self.subject

        def corrupt(act, site):
            if self.noise is None:  # drawn at the width the embedding has, once per Patcher
                self.noise = draw_noise(self.level, self.samples, s1 - s0, act.size(-1), self.seed)
            act = act.clone()
            act[1:, s0:s1] += self.noise.to(act.device, act.dtype).repeat(n_cells, 1, 1)
            return act

        return corrupt

    def _patches(self, cells: Sequence[Cell], frozen: dict[str, torch.Tensor], locate, offset: int = 0) -> list:
        """Restore / freeze hooks of ``cells`` laid out as rows ``1 + c*samples + k``."""
        S, device = self.samples, self.tokens.device
        restore, freeze = defaultdict(list), defaultdict(list)
        for c, cell in enumerate(cells):
            rows = torch.arange(1 + c * S, 1 + (c + 1) * S, device=device)
            for name in cell.restore:
                restore[self.table.resolve(name)].append((rows, cell.token))
            for name in cell.freeze:
                name = self.table.resolve(name)
                if name not in frozen:
                    raise ValueError(f"freeze: no recorded corrupted values for {name!r}")
                freeze[name].append((rows, cell.token))
        return [(name, patch(restore.get(name, []), freeze.get(name, []), frozen.get(name), S, locate, offset))
                for name in set(restore) | set(freeze)]

    def _pass(self, cells: Sequence[Cell], record: Sequence[str], frozen: dict[str, torch.Tensor], all_positions: bool):
        T = self.tokens.numel()
        R = 1 + self.samples * len(cells)
        batch = self.tokens.reshape(1, T).expand(R, T)
        running: dict[int, torch.Tensor] = {}
        locate = act_rows(R, running)
        patches = self._patches(cells, frozen, locate)
        fwd = [(self.sites.embed, self._corrupt(len(cells)))]
        if patches or record:
            fwd += [(name, remember(running)) for name in self.sites.active]
        rec: dict[str, torch.Tensor] = {}
        fwd += patches + [(self.table.resolve(name), recorder(rec, R, locate)) for name in record]
        with hooks(self.model, fwd):
            logits, maps = lm_logits(self.model, batch, all_positions)
        return logits, maps, {k: v[1:] for k, v in rec.items()}

    # ------------------------------------------------------------------ resumed passes
    def _start(self, cell: Cell):
        """``(first layer, first token)`` a cell changes; None = nothing (its rows are the
        plain corrupted run); :data:`_PLAIN` = a restored point outside the layers."""
        if not cell.restore:
            return None
        toks = torch.as_tensor(cell.token).reshape(-1)
        if int(toks.max()) < self.subject[0]:  # a decoder's states before the noise are clean already
            return None
        layers = [self.table[name].layer for name in cell.restore]
        return _PLAIN if None in layers else (min(layers), int(toks.min()))

    def _resume_checkpoint(self) -> LayerCheckpoint | None:
        """The clean + corrupted rows run once and kept. The resumer is checked once against
        a full pass (its checkpoint, and resuming half-way with nothing restored, must give the
        model's logits) and dropped with a warning if it fails."""
        if self._checkpoint is None:
            T = self.tokens.numel()
            with hooks(self.model, [(self.sites.embed, self._corrupt(1))]):
                ckpt = self.resumer.checkpoint(self.tokens.reshape(1, T).expand(1 + self.samples, T))
            rows = torch.arange(1 + self.samples, device=self.tokens.device)
            first = torch.full_like(rows, self.resumer.n_layers // 2)
            again = self.resumer.run_from_layer(ckpt, rows, first, (T - 1) // 2)
            full = self._pass([CORRUPTED], (), {}, False)[0]
            diff = max(float((x - full).abs().max()) for x in (ckpt.logits, again))
            if diff > 1e-3 + 1e-4 * float(full.abs().max()):
                warnings.warn(f"{type(self.resumer).__name__} does not reproduce the model's logits "
                              f"(max diff {diff:.3g}); using full passes", stacklevel=3)
                self.resumer = None
                return None
            self._checkpoint = ckpt
        return self._checkpoint

    def _run_resumed(self, cells: Sequence[Cell], starts: list, answer: int | None, frozen: dict[str, torch.Tensor]):
        """Cells grouped by first token, each group one pass (chunked) whose rows join at their
        first layer; cells with nothing to recompute take the checkpoint's corrupted rows."""
        ckpt, S = self._checkpoint, self.samples
        base = _probs(ckpt.logits, answer)
        probs = base[1:].repeat(len(cells), 1, 1).reshape(len(cells), S, -1)
        by_token = defaultdict(list)
        for i, start in enumerate(starts):
            if start is not None:
                by_token[start[1]].append(i)
        for token, idx in sorted(by_token.items()):
            idx.sort(key=lambda i: starts[i][0])
            for c0 in range(0, len(idx), self.per_pass):
                chunk = idx[c0 : c0 + self.per_pass]
                first = torch.tensor([starts[chunk[0]][0]] + [starts[i][0] for i in chunk for _ in range(S)])
                rows = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(1, S + 1).repeat(len(chunk))])
                R = rows.numel()
                with hooks(self.model, self._patches([cells[i] for i in chunk], frozen, prefix_rows(R), token)):
                    logits = self.resumer.run_from_layer(ckpt, rows.to(ckpt.logits.device), first, token)
                probs[chunk] = _probs(logits, answer)[1:].reshape(len(chunk), S, -1)
        return PatchRun(base[0], probs, None, None, {})


#: a cell the resumed path cannot serve
_PLAIN = "plain"


def _probs(logits: torch.Tensor, answer: int | None) -> torch.Tensor:
    p = torch.softmax(logits.double(), dim=-1)
    return p if answer is None else p[..., answer : answer + 1]
