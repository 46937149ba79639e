"""The hook functions of :class:`~xvariants.interpret.patching.Patcher`: restore / freeze
activations at (row, token) pairs, record corrupted values, and map a pass's batch rows to the
rows an activation actually holds (ACT bodies and resumed passes compute subsets of rows)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from xvariants.interpret.hooks import HookSite

#: (activation, site) -> batch row -> row of the activation (-1 = not computed at this firing)
Locate = Callable[[torch.Tensor, HookSite], torch.Tensor]


def act_rows(R: int, running: dict[int, torch.Tensor]) -> Locate:
    """Full passes: every row, or the rows the step's ``hook_active`` mask says ran (universal_xl)."""

    def locate(act: torch.Tensor, site: HookSite) -> torch.Tensor:
        if act.size(0) == R:
            return torch.arange(R, device=act.device)
        mask = running.get(site.layer)
        if mask is None or int(mask.any(1).sum()) != act.size(0):
            raise RuntimeError(f"{site.name} fired with {act.size(0)} of {R} rows and no running mask explains which")
        present = mask.any(1).nonzero().squeeze(1)
        local = torch.full((R,), -1, dtype=torch.long, device=act.device)
        local[present] = torch.arange(present.numel(), device=act.device)
        return local

    return locate


def prefix_rows(R: int) -> Locate:
    """Resumed passes: a layer holds the first ``act.size(0)`` rows (:mod:`.resume`)."""

    def locate(act: torch.Tensor, site: HookSite) -> torch.Tensor:
        local = torch.arange(R, device=act.device)
        local[act.size(0):] = -1
        return local

    return locate


def remember(running: dict[int, torch.Tensor]):
    """Keep each step's ``hook_active`` mask for :func:`act_rows`."""

    def fn(act, site):
        running[site.layer] = act

    return fn


def _pairs(pairs, device):
    """Every (row, token) pair of the cells that touch one point, as two index tensors."""
    if not pairs:
        return None
    grids = [torch.cartesian_prod(r, torch.as_tensor(t, device=device).reshape(-1)) for r, t in pairs]
    return torch.cat(grids).reshape(-1, 2).unbind(1)


def patch(restore, freeze, values: torch.Tensor | None, samples: int, locate: Locate, offset: int = 0):
    """Hook function: at each ``(rows, token)`` of ``restore`` copy row 0's value, at each of
    ``freeze`` write ``values`` (the plain corrupted run's ``[samples, T, ...]``; NaN = that row
    never ran the step, left alone). Activations hold positions ``offset..``."""
    device = restore[0][0].device if restore else freeze[0][0].device
    r_idx, f_idx = _pairs(restore, device), _pairs(freeze, device)

    def fn(act: torch.Tensor, site: HookSite):
        local = locate(act, site)
        act = act.clone()
        if r_idx is not None and local[0] >= 0:
            rows, toks = r_idx
            keep = local[rows] >= 0
            act[local[rows[keep]], toks[keep] - offset] = act[local[0], toks[keep] - offset]
        if f_idx is not None:
            rows, toks = f_idx
            vals = values[(rows - 1) % samples, toks]  # row 1 + c*S + k holds sample k
            keep = (local[rows] >= 0) & ~vals.isnan().reshape(len(vals), -1).any(1)
            act[local[rows[keep]], toks[keep] - offset] = vals[keep].to(act.dtype)
        return act

    return fn


def recorder(rec: dict[str, torch.Tensor], R: int, locate: Locate):
    """Hook function: keep the activation as ``[R, ...]`` (NaN in rows it does not hold)."""

    def fn(act, site):
        local = locate(act, site)
        full = act.new_full((R, *act.shape[1:]), float("nan"))
        full[local >= 0] = act[local[local >= 0]]
        rec[site.name] = full

    return fn
