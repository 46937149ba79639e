"""The target vector shared by ROME (v*) and MEMIT (z): a δ added at the subject's last token.

As the original ``compute_v`` / ``compute_z``: δ ∈ R^{d_model} is added to one activation (ROME:
the MLP output of the edited layer; MEMIT: the residual stream after the last critical layer)
at the subject's last token of every prompt: each context prefix + the rewrite prompt + the
target's tokens but the last (teacher forcing), plus the KL prompt "{subject} is a". The loss is

    NLL (per prompt the mean over target tokens, then the mean over prompts)
    + kl_factor · KL(P_δ ‖ P_0) of the KL prompt's next-token distribution at the subject's
      last token (the "essence" term)
    + v_weight_decay · ‖δ‖ / ‖v_init‖²      (the norm is not squared, as in the code)

minimised with Adam (:class:`Adam`); the loop stops when the loss is below ``early_stop_loss`` (checked before
the step) and makes at most ``v_num_grad_steps - 1`` updates; after each update δ is projected
into the ball of radius ``clamp_norm_factor · ‖v_init‖``. v_init is the activation at the bare
prompt (prefix ``""``, row 0). Gradients reach δ only (``torch.autograd.grad``): the model's
parameters get no ``.grad``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from xvariants.editing.requests import SLOT, EditError, EditRequest, encode_request, teacher_forced_batch
from xvariants.editing.runs import device_of, eval_mode, logits_at, pad
from xvariants.interpret.hooks import find_body


@dataclass(frozen=True)
class TargetOptions:
    """The optimisation of δ (the original's hparams names).

    :param v_lr: Adam learning rate. :param v_num_grad_steps: iterations (at most this minus one
        updates). :param v_weight_decay: weight of ‖δ‖ / ‖v_init‖². :param kl_factor: weight of the
        essence KL. :param clamp_norm_factor: δ stays within this times ‖v_init‖.
    :param early_stop_loss: stop once the total loss is below this.
    :param kl_prompt: template of the essence prompt.
    """

    v_lr: float = 0.5
    v_num_grad_steps: int = 20
    v_weight_decay: float = 0.5
    kl_factor: float = 0.0625
    clamp_norm_factor: float = 4.0
    early_stop_loss: float = 5e-2
    kl_prompt: str = "{} is a"


@dataclass
class TargetFit:
    """δ, the activation it is added to (``init`` at the bare prompt) and the loss per step."""

    delta: torch.Tensor
    init: torch.Tensor
    losses: list[dict[str, float]]

    @property
    def target(self) -> torch.Tensor:
        return self.init + self.delta


def fit_target(model: nn.Module, tokenizer: Any, request: EditRequest, prefixes: Sequence[str],
               hook_names: Sequence[str], options: TargetOptions,
               active_hooks: Sequence[str | None] = ()) -> TargetFit:
    """Optimise δ added at ``hook_names`` (one name; a UT with keys averaged over steps: one per
    step, the same δ at each) at the subject's last token. ``prefixes[0]`` must be ``""``.
    ``active_hooks``: per hook name, the ACT running mask that says which steps v_init averages."""
    if not prefixes or prefixes[0] != "":
        raise EditError("prefixes[0] must be the empty prefix (v_init is read on the bare prompt)")
    if options.v_num_grad_steps < 1:
        raise EditError(f"v_num_grad_steps must be >= 1, got {options.v_num_grad_steps}")
    rewrites = [encode_request(tokenizer, request, p, target=request.target_new) for p in prefixes]
    kl_request = EditRequest(options.kl_prompt if SLOT in options.kl_prompt else SLOT + " " + options.kl_prompt,
                             request.subject, request.target_new)
    kl = encode_request(tokenizer, kl_request)
    seqs, rows, cols, targets = teacher_forced_batch(rewrites)
    seqs.append(list(kl.ids))
    lookups = [enc.lookup for enc in rewrites] + [kl.lookup]
    n_rw = len(rewrites)
    with eval_mode(model) as inner:
        dev = device_of(inner)
        dtype = next(inner.parameters()).dtype
        batch = pad(seqs, dev)
        look_rows = torch.arange(len(seqs), device=dev)
        look_cols = torch.as_tensor(lookups, device=dev)
        rows_t = torch.as_tensor(rows + [n_rw], device=dev)
        cols_t = torch.as_tensor(cols + [kl.lookup], device=dev)
        targets_t = torch.as_tensor(targets, device=dev)
        per_row = torch.as_tensor(rows, device=dev)
        n_target = torch.bincount(per_row, minlength=n_rw).double()  # target tokens per prompt
        seen: dict[str, torch.Tensor] = {}
        delta = torch.zeros(d_model_of(inner), dtype=dtype, device=dev, requires_grad=True)

        def add_delta(act, hook):
            if hook.name not in seen:
                seen[hook.name] = act[0, lookups[0]].detach().double().clone()
            act = act.clone()
            act[look_rows, look_cols] = act[look_rows, look_cols] + delta
            return act

        active: dict[str, torch.Tensor] = {}

        def grab_active(act, hook):
            active[hook.name] = act[0, lookups[0]].detach()

        extra = [(n, grab_active) for n in active_hooks if n is not None]
        adam = Adam(delta, options.v_lr)
        losses: list[dict[str, float]] = []
        init = kl_init = None
        for it in range(options.v_num_grad_steps):
            logits = logits_at(inner, batch, rows_t, cols_t, [(n, add_delta) for n in hook_names] + extra)
            logp = torch.log_softmax(logits.double(), -1)
            if init is None:
                init = _mean_init(seen, hook_names, active, active_hooks)
                kl_init = logp[-1].detach()
            token_nll = -logp[:-1].gather(1, targets_t[:, None])[:, 0]
            nll_each = torch.zeros(n_rw, dtype=torch.float64, device=dev).index_add(0, per_row, token_nll) / n_target
            nll = nll_each.mean()
            kl_loss = options.kl_factor * (logp[-1].exp() * (logp[-1] - kl_init)).sum()
            wd = options.v_weight_decay * delta.double().norm() / init.norm() ** 2
            loss = nll + kl_loss + wd
            losses.append({"loss": loss.item(), "nll": nll.item(), "kl": kl_loss.item(), "weight_decay": wd.item(),
                           "p_target": torch.exp(-nll_each).mean().item()})
            if loss.item() < options.early_stop_loss or it == options.v_num_grad_steps - 1:
                break
            (grad,) = torch.autograd.grad(loss, [delta])
            adam.step(grad)
            with torch.no_grad():
                max_norm = options.clamp_norm_factor * init.norm()
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
    return TargetFit(delta.detach().double().cpu(), init.cpu(), losses)


class Adam:
    """Adam on one tensor, the update of ``torch.optim.Adam`` (betas 0.9/0.999, eps 1e-8, L2
    ``weight_decay`` added to the gradient) written out: constructing the library optimiser
    imports ``torch._dynamo``, seconds that a one-edit process would spend before its first step."""

    def __init__(self, param: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        self.param, self.lr, self.betas, self.eps, self.weight_decay = param, lr, betas, eps, weight_decay
        self.m = torch.zeros_like(param)
        self.v = torch.zeros_like(param)
        self.t = 0

    @torch.no_grad()
    def step(self, grad: torch.Tensor) -> None:
        b1, b2 = self.betas
        self.t += 1
        if self.weight_decay:
            grad = grad.add(self.param, alpha=self.weight_decay)
        self.m.mul_(b1).add_(grad, alpha=1 - b1)
        self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (self.v.sqrt() / math.sqrt(1 - b2**self.t)).add_(self.eps)
        self.param.addcdiv_(self.m, denom, value=-self.lr / (1 - b1**self.t))


def d_model_of(model: nn.Module) -> int:
    """The residual width (δ's size), as the model's body says it."""
    d = getattr(find_body(model), "d_model", None) or getattr(model, "d_model", None)
    if d is None:
        raise ValueError("cannot tell d_model: the model's body does not say it")
    return int(d)


def _mean_init(seen: dict[str, torch.Tensor], names: Sequence[str], active: dict[str, torch.Tensor],
               active_hooks: Sequence[str | None]) -> torch.Tensor:
    """v_init: the bare prompt's activation, averaged over the steps at which its subject token ran."""
    vals, weights = [], []
    for i, n in enumerate(names):
        if n not in seen:  # a step every position halted before: it did not run
            continue
        a = active_hooks[i] if i < len(active_hooks) else None
        weights.append(float(active[a]) if a is not None and a in active else 1.0)
        vals.append(seen[n])
    if not vals:
        raise ValueError("the subject's last token ran none of the chosen steps")
    w = torch.tensor(weights, dtype=torch.float64)
    if float(w.sum()) == 0:
        raise ValueError("the subject's last token ran none of the chosen steps")
    return (torch.stack(vals) * w[:, None].to(vals[0].device)).sum(0) / w.sum()
