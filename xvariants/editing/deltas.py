"""What an edit returns: the weight changes, and the exact way back.

Every ΔW is kept in float64 in the ``[d_model, d_mlp]`` orientation (value = W · key), whatever
layout the module stores (``nn.Linear`` or GPT-2's ``Conv1D``). Applying an edit first copies the
weights it touches; restoring copies those tensors back, so an edit then its undo gives
bit-identical weights (subtracting ΔW again would leave rounding residue in float32).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from xvariants.interpret.mlp_memory import MLPMemory


@torch.no_grad()
def write_delta(memory: MLPMemory, original: torch.Tensor, delta: torch.Tensor) -> None:
    """Set the weight to ``original + delta`` (``delta`` ``[d_model, d_mlp]``), summed in float64
    and rounded once to the weight's dtype; ``original`` is in the module's own layout."""
    base = original.t() if memory.weight_is_in_out else original
    memory.w_out_in().copy_((base.double() + delta.to(base.device, torch.float64)).to(memory.weight.dtype))


class WeightSnapshot:
    """Copies of some weights, written back bit for bit by :meth:`restore` (a context manager:
    ``with WeightSnapshot(params): ...`` restores on exit, exceptions included)."""

    def __init__(self, weights: Iterable[torch.nn.Parameter]):
        self.weights: list[torch.nn.Parameter] = []
        for w in weights:
            if not any(w is o for o in self.weights):
                self.weights.append(w)
        self.copies = [w.detach().clone() for w in self.weights]

    def original(self, weight: torch.nn.Parameter) -> torch.Tensor:
        return next(c for w, c in zip(self.weights, self.copies) if w is weight)

    @torch.no_grad()
    def restore(self) -> None:
        for w, c in zip(self.weights, self.copies):
            w.copy_(c)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


@dataclass
class EditResult:
    """One edit (ROME, MEMIT or fine-tuning) of one or many requests.

    :param method: ``"ROME"``, ``"MEMIT"`` or ``"FT-L"``.
    :param deltas: module path of each changed weight -> ΔW ``[d_model, d_mlp]`` (float64).
    :param memories: module path -> its :class:`MLPMemory` (the weight and its layout).
    :param info: what the method computed: ROME ``k_star`` (prefix-averaged key), ``k0`` (bare
        prompt key), ``v_star``, ``u``, ``r``, ``losses``, ``steps``; MEMIT ``z``, per-layer keys and
        residual norms; all with ``seconds``.
    An applied result is a context manager that restores the weights on exit.
    """

    method: str
    deltas: dict[str, torch.Tensor]
    memories: dict[str, MLPMemory] = field(repr=False)
    info: dict[str, Any] = field(default_factory=dict, repr=False)
    snapshot: WeightSnapshot | None = field(default=None, repr=False)

    @property
    def applied(self) -> bool:
        return self.snapshot is not None

    def apply(self) -> EditResult:
        """Write ``W + ΔW`` into the model (after copying ``W``); refused when already applied."""
        if self.snapshot is not None:
            raise RuntimeError(f"this {self.method} edit is already applied; restore() it first")
        snapshot = WeightSnapshot(m.weight for m in self.memories.values())
        for path, delta in self.deltas.items():
            mem = self.memories[path]
            write_delta(mem, snapshot.original(mem.weight), delta)
        self.snapshot = snapshot
        return self

    def restore(self) -> None:
        """Put back the exact weights :meth:`apply` found (a no-op when not applied)."""
        if self.snapshot is not None:
            self.snapshot.restore()
            self.snapshot = None

    def rank(self, path: str | None = None, rtol: float = 1e-9) -> int:
        """Numerical rank of one ΔW (the only one when ``path`` is None)."""
        delta = self.deltas[path if path is not None else next(iter(self.deltas))]
        return int(torch.linalg.matrix_rank(delta, rtol=rtol))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


@contextlib.contextmanager
def preserved(*results_or_weights) -> Iterator[WeightSnapshot]:
    """Keep the listed weights (parameters, :class:`MLPMemory` or :class:`EditResult` objects)
    as they are now and restore them on exit: wraps a sequence of edits (sequential ROME)."""
    weights = []
    for x in results_or_weights:
        if isinstance(x, EditResult):
            weights += [m.weight for m in x.memories.values()]
        elif isinstance(x, MLPMemory):
            weights.append(x.weight)
        else:
            weights.append(x)
    with WeightSnapshot(weights) as snap:
        yield snap
