"""FT-L: ROME's constrained fine-tuning baseline (``baselines/ft``, ``hparams/FT/*_constr.json``).

Only one MLP output weight is trained (Adam, lr 5e-4, no weight decay, 25 steps) on the rewrite
prompt(s), and after every step each entry is clamped to within ``norm_constraint`` of its
original value (an L∞ ball). Steps are skipped while the loss is below 1e-2, and training stops
once a whole pass is. Two deviations, both for correctness: the loss is the teacher-forced
NLL of every target token (the original scores all target tokens at the prompt's last
position, which is right only for one-token targets), and the bias stays as it is (the original
also trains the projection's bias, because its name filter matches both).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from xvariants.editing.deltas import EditResult, WeightSnapshot
from xvariants.editing.requests import EditError, EditRequest, encode_request, teacher_forced_batch
from xvariants.editing.rome import as_request
from xvariants.editing.runs import device_of, edit_site, eval_mode, logits_at, pad
from xvariants.editing.values import Adam


@dataclass(frozen=True)
class FTOptions:
    """:param lr: Adam learning rate. :param num_steps: passes over the requests.
    :param norm_constraint: L∞ bound of the change per weight entry (None: unconstrained FT).
    :param weight_decay: Adam weight decay. :param batch_size: requests per step.
    :param stop_loss: skip steps / stop below this loss."""

    lr: float = 5e-4
    num_steps: int = 25
    norm_constraint: float | None = 5e-4
    weight_decay: float = 0.0
    batch_size: int = 64
    stop_loss: float = 1e-2


def ft_edit(model: nn.Module, tokenizer: Any, requests: EditRequest | dict | Sequence[EditRequest | dict], *,
            layer: int, options: FTOptions = FTOptions(), apply: bool = True) -> EditResult:
    """Fine-tune ``layer``'s MLP output weight towards each request's ``target_new``."""
    t0 = time.perf_counter()
    if isinstance(requests, (EditRequest, dict)):
        requests = [requests]
    requests = [as_request(r) for r in requests]
    if not requests:
        raise EditError("requests: nothing to edit")
    if options.norm_constraint is not None and not options.norm_constraint > 0:
        raise EditError(f"norm_constraint must be > 0 or None, got {options.norm_constraint}")
    mem = edit_site(model, layer).memory
    encoded = [encode_request(tokenizer, r, target=r.target_new) for r in requests]
    snapshot = WeightSnapshot([mem.weight])
    original = snapshot.original(mem.weight)
    weight = mem.weight
    flags = {p: p.requires_grad for p in model.parameters()}
    losses: list[float] = []
    try:
        with eval_mode(model) as inner:
            dev = device_of(inner)
            for p in inner.parameters():  # no graph through the frozen weights
                p.requires_grad_(p is weight)
            adam = Adam(weight, options.lr, weight_decay=options.weight_decay)
            for _ in range(options.num_steps):
                total, count = 0.0, 0
                for at in range(0, len(encoded), options.batch_size):
                    chunk = encoded[at : at + options.batch_size]
                    seqs, rows, cols, targets = teacher_forced_batch(chunk)
                    norm = [1.0 / len(chunk[r].target) for r in rows]  # each prompt's mean NLL
                    logits = logits_at(inner, pad(seqs, dev), torch.as_tensor(rows, device=dev),
                                       torch.as_tensor(cols, device=dev))
                    nll = -torch.log_softmax(logits.float(), -1).gather(1, torch.as_tensor(targets, device=dev)[:, None])[:, 0]
                    loss = (nll * torch.as_tensor(norm, device=dev)).sum() / len(chunk)
                    total += loss.item() * len(chunk)
                    count += len(chunk)
                    if loss.item() >= options.stop_loss:
                        (grad,) = torch.autograd.grad(loss, [weight])
                        adam.step(grad)
                    if options.norm_constraint is not None:
                        with torch.no_grad():
                            eps = options.norm_constraint
                            weight.copy_(torch.maximum(torch.minimum(weight, original + eps), original - eps))
                losses.append(total / count)
                if losses[-1] < options.stop_loss:
                    break
    except BaseException:
        snapshot.restore()
        raise
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    delta = weight.detach().double() - original.double()
    delta = delta.t() if mem.weight_is_in_out else delta
    result = EditResult("FT-L", {mem.path: delta.cpu()}, {mem.path: mem},
                        {"layer": layer, "losses": losses, "options": asdict(options),
                         "seconds": time.perf_counter() - t0}, snapshot=snapshot)
    if not apply:
        result.restore()
    return result
