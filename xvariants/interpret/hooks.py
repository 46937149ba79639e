"""Canonical hook names, ``run_with_hooks`` and ``run_with_cache`` for every xvariants body.

The layers carry :class:`~xvariants.layers.hooks.HookPoint` identity modules. This module
gives each *firing* of a hook point a stable, TransformerLens-style name:

* ``hook_embed``, ``hook_pos_embed`` (the input embedding), body-level points by their own
  name (``hook_pos`` = Transformer-XL's relative sinusoids, ``hook_act_output`` = the UT's
  ponder-weighted output);
* layered bodies (vanilla, XL): ``blocks.{l}.hook_resid_pre`` ... ``blocks.{l}.attn.hook_pattern``,
  ``blocks.{l}.mlp.hook_post``; ``steps.{l}.*`` is an alias (a layer is a step);
* the Universal Transformer: one shared block fires once per application step, so its points
  are named per step, ``steps.{n}.attn.hook_pattern`` etc. (``body.current_step`` tells the
  firing apart); the step's own points (``steps.{n}.hook_resid_pre`` = state + signals,
  ``steps.{n}.hook_resid_post`` = state after the step with halted positions copied,
  ``steps.{n}.hook_halting_prob``, ``steps.{n}.hook_active``) keep their names, and the
  shared block's ``hook_resid_pre/post`` (the block's input and raw output) become
  ``steps.{n}.block.hook_resid_pre/post``.

A hook function is ``fn(activation, hook) -> replacement | None`` where ``hook`` is the
:class:`HookSite` (``hook.name``, ``hook.step``, ``hook.path``). Hooks are PyTorch forward
hooks on the identity modules and are always removed when the call ends, exceptions included,
so a model with no hook attached runs exactly the code it ran before.
"""

from __future__ import annotations

import contextlib
import difflib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import nn

from xvariants.layers.hooks import HookPoint

HookFn = Callable[[torch.Tensor, "HookSite"], Union[torch.Tensor, None]]
NameOrFilter = Union[str, Callable[[str], bool]]

#: short activation kinds -> name suffix inside a step (``act_name``)
KIND_SUFFIX = {
    "resid_pre": "hook_resid_pre",
    "attn_out": "hook_attn_out",
    "resid_mid": "hook_resid_mid",
    "mlp_out": "hook_mlp_out",
    "resid_post": "hook_resid_post",
    "q": "attn.hook_q",
    "k": "attn.hook_k",
    "v": "attn.hook_v",
    "scores": "attn.hook_scores",
    "pattern": "attn.hook_pattern",
    "z": "attn.hook_z",
    "mem": "attn.hook_mem",
    "r": "attn.hook_r",
    "content_score": "attn.hook_content_score",
    "position_score": "attn.hook_position_score",
    "pre": "mlp.hook_pre",
    "post": "mlp.hook_post",
    "halting_prob": "hook_halting_prob",
    "active": "hook_active",
}
GLOBAL_KINDS = {"embed": "hook_embed", "pos_embed": "hook_pos_embed"}

_LAYERED = re.compile(r"^(blocks|steps)\.(\d+)\.(.+)$")


@dataclass(frozen=True, eq=False)
class HookSite:
    """One named activation: the identity module it flows through and, for modules shared
    across steps (the UT block), the step at which this name fires.

    :param name: canonical name (``blocks.0.attn.hook_pattern``, ``steps.3.hook_resid_post``).
    :param module: the :class:`HookPoint`.
    :param path: the module's path in the model (``body.block.attn.hook_pattern``).
    :param step: application step the name is bound to when the module fires at several steps
        (UT shared block); None when the module fires once per forward.
    :param layer: the layer/step index of layered names (None for global points).
    :param aliases: other accepted names.
    """

    name: str
    module: HookPoint
    path: str
    step: int | None = None
    layer: int | None = None
    aliases: tuple[str, ...] = ()
    body: nn.Module | None = field(default=None, repr=False)

    def fires_now(self) -> bool:
        """True when the current firing of the module belongs to this name."""
        return self.step is None or getattr(self.body, "current_step", None) == self.step

    def __repr__(self) -> str:  # short: hook functions print it
        return f"HookSite({self.name!r})"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The network inside a Lightning task (``LMTask.model``); other modules unchanged."""
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module) and any(isinstance(m, HookPoint) for m in inner.modules()):
        return inner
    return model


def find_body(model: nn.Module) -> nn.Module | None:
    """The body of a language model / classifier (or the model itself if it is a body)."""
    model = unwrap_model(model)
    body = getattr(model, "body", None)
    if isinstance(body, nn.Module):
        return body
    from xvariants.models.contract import Body

    return model if isinstance(model, Body) else None


def step_prefix(model: nn.Module) -> str:
    """``steps`` for step-shared bodies (UT), ``blocks`` for layered ones."""
    body = find_body(model)
    return "steps" if body is not None and hasattr(body, "block") and hasattr(body, "steps") else "blocks"


class HookTable(Mapping):
    """All hook names of a model: canonical name -> :class:`HookSite` (in forward order as
    far as module order allows); also resolves aliases and raw module paths."""

    def __init__(self, model: nn.Module):
        self.model = unwrap_model(model)
        self.body = find_body(self.model)
        self.sites: dict[str, HookSite] = {}
        self._alias: dict[str, str] = {}
        self._build()

    # ------------------------------------------------------------------ building
    def _add(self, site: HookSite) -> None:
        if site.name in self.sites:
            raise RuntimeError(f"two hook points claim the canonical name {site.name!r}")
        self.sites[site.name] = site
        for a in (site.name, *site.aliases):
            self._alias.setdefault(a, site.name)

    def _build(self) -> None:
        body = self.body
        body_path = None
        for path, mod in self.model.named_modules():
            if mod is body:
                body_path = path
                break
        shared: list[tuple[str, str, HookPoint]] = []  # (rel path inside the shared block, path, module)
        for path, mod in self.model.named_modules():
            if not isinstance(mod, HookPoint):
                continue
            rel = path
            if body_path is not None and body_path != "" and path.startswith(body_path + "."):
                rel = path[len(body_path) + 1 :]
            elif body_path == "":
                rel = path
            elif path.startswith("embed."):
                rel = path[len("embed.") :]
            if body is not None and hasattr(body, "block") and hasattr(body, "steps") and rel.startswith("block."):
                shared.append((rel[len("block.") :], path, mod))
                continue
            m = _LAYERED.match(rel)
            if m:
                kind, idx, rest = m.group(1), int(m.group(2)), m.group(3)
                other = "steps" if kind == "blocks" else "blocks"
                self._add(
                    HookSite(f"{kind}.{idx}.{rest}", mod, path, None, idx, (f"{other}.{idx}.{rest}", path), body)
                )
            else:
                self._add(HookSite(rel, mod, path, None, None, (path,) if path != rel else (), body))
        if shared:
            n_steps = len(body.steps)
            for n in range(n_steps):
                for rest, path, mod in shared:
                    name = f"steps.{n}.{rest}"
                    if name in self.sites:  # the step's own point wins (resid_pre/post)
                        name = f"steps.{n}.block.{rest}"
                    self._add(HookSite(name, mod, path, n, n, (f"blocks.{n}.{name.split('.', 2)[2]}",), body))

    # ------------------------------------------------------------------ mapping API
    def __getitem__(self, name: str) -> HookSite:
        return self.sites[self.resolve(name)]

    def __iter__(self) -> Iterator[str]:
        return iter(self.sites)

    def __len__(self) -> int:
        return len(self.sites)

    def resolve(self, name: str) -> str:
        """Canonical name of ``name`` (canonical, alias, or module path); KeyError otherwise."""
        if name in self._alias:
            return self._alias[name]
        if name.startswith("model.") and name[len("model.") :] in self._alias:
            return self._alias[name[len("model.") :]]
        close = difflib.get_close_matches(name, list(self.sites), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f" ({len(self.sites)} names, e.g. {next(iter(self.sites), '-')})"
        raise KeyError(f"no hook point named {name!r} in this model{hint}")

    def select(self, names: NameOrFilter | Iterable[str] | None) -> list[HookSite]:
        """Sites selected by a name, a list of names, a predicate on canonical names, or None (all)."""
        if names is None:
            return list(self.sites.values())
        if isinstance(names, str):
            return [self[names]]
        if callable(names):
            return [s for n, s in self.sites.items() if names(n)]
        out, seen = [], set()
        for n in names:
            s = self[n]
            if s.name not in seen:
                seen.add(s.name)
                out.append(s)
        return out


def hook_names(model: nn.Module) -> list[str]:
    """Every canonical hook name of ``model``."""
    return list(HookTable(model))


def act_name(kind: str, step: int | None = None, model: nn.Module | None = None) -> str:
    """Shorthand: ``act_name("pattern", 3) == "blocks.3.attn.hook_pattern"`` (``steps.3...`` for
    a UT model); ``act_name("embed") == "hook_embed"``."""
    if kind in GLOBAL_KINDS:
        return GLOBAL_KINDS[kind]
    if kind not in KIND_SUFFIX:
        raise KeyError(f"unknown activation kind {kind!r}; known: {sorted(KIND_SUFFIX) + sorted(GLOBAL_KINDS)}")
    if step is None:
        raise ValueError(f"activation kind {kind!r} needs a step/layer index")
    prefix = step_prefix(model) if model is not None else "blocks"
    return f"{prefix}.{step}.{KIND_SUFFIX[kind]}"


# ---------------------------------------------------------------------- attaching hooks
def _wrap(site: HookSite, fn: HookFn):
    def hook(module, inputs, output):
        if not site.fires_now():
            return None
        return fn(output, site)

    return hook


@contextlib.contextmanager
def hooks(model: nn.Module, fwd_hooks: Iterable[tuple[NameOrFilter, HookFn]] = ()):
    """Context manager: attach ``fwd_hooks`` (``(name or predicate, fn)``) for the block's duration.

    Every handle is removed on exit, also when the block raises.
    """
    table = HookTable(model)
    handles = []
    try:
        for name, fn in fwd_hooks:
            sites = table.select(name) if not isinstance(name, str) else [table[name]]
            if not sites and not isinstance(name, str):
                raise KeyError("a hook filter matched no hook point")
            for site in sites:
                handles.append(site.module.register_forward_hook(_wrap(site, fn)))
        yield table
    finally:
        for h in handles:
            h.remove()


def run_with_hooks(
    model: nn.Module, tokens: Any, fwd_hooks: Iterable[tuple[NameOrFilter, HookFn]] = (), **forward_kwargs
):
    """``model(tokens, **forward_kwargs)`` with ``fwd_hooks`` attached; a hook function that returns
    a tensor replaces the activation. Hooks are removed afterwards, also on exceptions."""
    with hooks(model, fwd_hooks):
        return model(tokens, **forward_kwargs)


# ---------------------------------------------------------------------- cache
class ActivationCache(Mapping):
    """Activations recorded by :func:`run_with_cache`: canonical name -> tensor, with metadata.

    Lookup accepts canonical names, aliases (``steps.0...`` for ``blocks.0...``), module
    paths, and ``(kind, step)`` tuples with negative steps counting from the last recorded
    step: ``cache["pattern", -1]``. ``cache.meta[name]`` holds ``step`` (layer or application
    step), ``path`` (the module = the parameter owner) and, for ``attn.hook_pattern`` /
    score hooks, ``n_memory`` and ``is_memory`` (which keys are Transformer-XL memory).
    """

    def __init__(self, table: HookTable):
        self.table = table
        self.data: dict[str, torch.Tensor] = {}
        self.meta: dict[str, dict[str, Any]] = {}

    def _key(self, key) -> str:
        if isinstance(key, tuple):
            kind, step = key[0], key[1]
            if kind in GLOBAL_KINDS:
                return GLOBAL_KINDS[kind]
            if step < 0:
                suffix = KIND_SUFFIX.get(kind)
                steps = sorted({m["step"] for n, m in self.meta.items() if m["step"] is not None and n.endswith(suffix or "")})
                if not steps:
                    raise KeyError(f"no {kind!r} activations in this cache")
                step = steps[step]
            return self.table.resolve(act_name(kind, step, self.table.model))
        return self.table.resolve(key)

    def __getitem__(self, key) -> torch.Tensor:
        name = self._key(key)
        if name not in self.data:
            raise KeyError(f"{name!r} was not recorded (not selected by names_filter, or it did not fire)")
        return self.data[name]

    def __contains__(self, key) -> bool:
        try:
            return self._key(key) in self.data
        except KeyError:
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def stack(self, kind: str) -> torch.Tensor:
        """Stack one kind over its recorded steps, ``[n_steps, ...]`` (shapes must agree)."""
        suffix = KIND_SUFFIX[kind]
        names = sorted(
            (m["step"], n) for n, m in self.meta.items()
            if m["step"] is not None and n.count(".") >= 2 and n.split(".", 2)[2] == suffix
        )
        if not names:
            raise KeyError(f"no {kind!r} activations in this cache")
        return torch.stack([self.data[n] for _, n in names])

    def __repr__(self) -> str:
        return f"ActivationCache({len(self.data)} activations: {', '.join(list(self.data)[:4])}{', ...' if len(self.data) > 4 else ''})"


#: attention-shaped points [B, H, T, S] whose first S - T keys are Transformer-XL memory
_KEYED = ("attn.hook_pattern", "attn.hook_scores", "attn.hook_content_score", "attn.hook_position_score")


def _record(cache: ActivationCache, detach: bool, device):
    def fn(act, site: HookSite):
        t = act.detach() if detach else act
        if device is not None:
            t = t.to(device)
        cache.data[site.name] = t
        meta = {"step": site.layer, "path": site.path, "calls": cache.meta.get(site.name, {}).get("calls", 0) + 1}
        if site.name.endswith(_KEYED) and t.dim() == 4:
            T, S = t.shape[-2], t.shape[-1]
            meta["n_memory"] = S - T
            meta["is_memory"] = torch.arange(S) < (S - T)
        cache.meta[site.name] = meta
        return None

    return fn


def run_with_cache(
    model: nn.Module,
    tokens: Any,
    names_filter: NameOrFilter | Iterable[str] | None = None,
    *,
    detach: bool = True,
    device: torch.device | str | None = None,
    fwd_hooks: Iterable[tuple[NameOrFilter, HookFn]] = (),
    **forward_kwargs,
):
    """Run ``model(tokens, **forward_kwargs)`` and record activations.

    :param names_filter: None (every point; note this materialises attention probabilities),
        a name, a list of names, or a predicate on canonical names.
    :param detach: store detached tensors (default) or keep the autograd graph.
    :param device: move recorded tensors there (e.g. ``"cpu"``).
    :param fwd_hooks: extra hooks run before recording (e.g. a patch whose effect you cache).
    Returns ``(output, ActivationCache)``.
    """
    table = HookTable(model)
    cache = ActivationCache(table)
    rec = _record(cache, detach, device)
    selected = table.select(names_filter)
    fwd = list(fwd_hooks) + [(s.name, rec) for s in selected]
    with hooks(model, fwd):
        out = model(tokens, **forward_kwargs)
    return out, cache
