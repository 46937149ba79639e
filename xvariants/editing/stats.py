"""Key statistics: the uncentred second moment C = E[k kᵀ] of one MLP's keys.

ROME whitens its key direction with C⁻¹ and MEMIT weighs its update against λ·C; both use
``SecondMoment.moment()`` of the original code, Σ k kᵀ / count over every token of a corpus.
Here keys are streamed over token windows and summed in float64 (the original sums in
float32 over ~44M keys; float64 keeps the sum exact enough at any count). For a Universal
Transformer the one weight reads keys at every step, so by default the keys of all steps are
pooled (only positions still running under ACT count); ``step=n`` takes one step's keys.
Stateful bodies (Transformer-XL) stream the corpus as parallel segments and carry their memory,
so the keys are those of realistic contexts.

Results are cached as safetensors under ``cache_dir/<fingerprint>/<corpus>/`` keyed by the
model fingerprint (a hash of every parameter and buffer), layer/step, corpus name, token count
and window length. :meth:`KeyStats.check` refuses a C that is rank-deficient or ill-conditioned with the
count it needs.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from xvariants.editing.requests import EditError
from xvariants.editing.runs import device_of, edit_site, eval_mode, mlp_steps
from xvariants.interpret.hooks import find_body, hooks, unwrap_model
from xvariants.interpret.patching import lm_logits

#: largest accepted condition number λ_max / λ_min of C (float64 solves stay accurate to ~6 digits)
MAX_CONDITION = 1e10
#: tokens per MLP width the error message recommends
RECOMMENDED_PER_DIM = 10


class StatsError(EditError):
    """Key statistics that cannot serve an edit (too few keys, ill-conditioned, wrong layer)."""


@dataclass(frozen=True)
class KeyStats:
    """C = E[k kᵀ] of one MLP's keys.

    :param moment: ``[d_mlp, d_mlp]`` float64, Σ k kᵀ / count.
    :param count: keys summed (tokens x running steps when steps are pooled).
    :param n_tokens: corpus tokens streamed.
    :param layer: the layer (the UT: any step; the weight is shared).
    :param step: ``"all"`` (pooled over steps), one step, or None for layered bodies.
    :param corpus: name of the corpus. :param fingerprint: :func:`model_fingerprint`.
    """

    moment: torch.Tensor
    count: int
    n_tokens: int
    layer: int
    step: int | str | None = None
    corpus: str = ""
    fingerprint: str = ""

    @property
    def d_mlp(self) -> int:
        return self.moment.shape[0]

    def describe(self) -> str:
        at = f"layer {self.layer}" + ("" if self.step is None else f", step {self.step}")
        return f"key statistics ({at}, corpus {self.corpus or '?'}, {self.n_tokens} tokens)"

    @property
    def live(self) -> torch.Tensor:
        """``[d_mlp]`` bool: key units that were ever non-zero (a ReLU unit that never fired in the
        corpus has a zero row and column in C; the solves leave it out, see :func:`solve_live`)."""
        return self.moment.diagonal() > 0

    @functools.cached_property
    def eigenvalues(self) -> torch.Tensor:
        """Eigenvalues of C on the live units, ascending (computed once: every edit checks them)."""
        live = self.live
        return torch.linalg.eigvalsh(self.moment[live][:, live])

    def check(self, max_condition: float = MAX_CONDITION) -> None:
        """Raise :class:`StatsError` unless C has at least d_mlp keys behind it and, on its live
        units, condition number <= ``max_condition``."""
        d = self.d_mlp
        want = RECOMMENDED_PER_DIM * d
        if self.count < d:
            raise StatsError(
                f"{self.describe()}: {self.count} keys for d_mlp = {d}, so C = E[kkᵀ] has rank at most "
                f"{self.count}; stream at least {d} key tokens (about {want} for a well-conditioned C)"
            )
        eig = self.eigenvalues
        if eig.numel() == 0:
            raise StatsError(f"{self.describe()}: every key is zero; is this the right layer?")
        top, low = float(eig[-1]), float(eig[0])
        if not np.isfinite(top) or top <= 0 or low <= top / max_condition:
            cond = float("inf") if low <= 0 else top / low
            raise StatsError(
                f"{self.describe()}: C is ill-conditioned (condition number {cond:.3g} > {max_condition:.3g}; "
                f"{int((eig <= top / max_condition).sum())} of {eig.numel()} key directions are (almost) never "
                f"used); stream more tokens (at least {want} for d_mlp = {d}) or text closer to the model's "
                "training data"
            )


def solve_live(a: torch.Tensor, b: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """``a⁻¹ b`` on the ``live`` rows/columns of ``a`` (float64), zero on the others: an update
    never reads a key unit the statistics never saw fire."""
    out = torch.zeros(b.shape, dtype=torch.float64)
    idx = live.nonzero().squeeze(1)
    out[idx] = torch.linalg.solve(a.double()[idx][:, idx], b.double()[idx])
    return out


def model_fingerprint(model: nn.Module) -> str:
    """16 hex digits of a hash over every parameter and buffer (names, shapes, dtypes, bytes)."""
    h = hashlib.blake2b(digest_size=8)
    for name, t in unwrap_model(model).state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def stream_batches(ids: np.ndarray | torch.Tensor, n_tokens: int, seq_len: int, batch_size: int) -> Iterator[torch.Tensor]:
    """The first ``n_tokens`` of a 1-D token stream as ``batch_size`` parallel contiguous
    streams cut into ``[batch_size, seq_len]`` windows (the last window may be shorter):
    consecutive batches continue each row's text, as a stateful body's memory expects."""
    ids = torch.as_tensor(np.asarray(ids), dtype=torch.long).reshape(-1)
    if n_tokens > ids.numel():
        raise StatsError(f"key statistics: {n_tokens} tokens asked for, the corpus has {ids.numel()}")
    rows = max(1, min(batch_size, n_tokens // max(seq_len, 1) or 1))
    per_row = n_tokens // rows
    grid = ids[: rows * per_row].reshape(rows, per_row)
    for at in range(0, per_row, seq_len):
        yield grid[:, at : at + seq_len]


@torch.no_grad()
def collect_key_stats(model: nn.Module, layer: int, batches: Iterable[torch.Tensor], *, step: int | str | None = None,
                      corpus: str = "", fingerprint: str | None = None) -> KeyStats:
    """Stream ``batches`` (``[B, T]`` token ids) through ``model`` and sum k kᵀ of ``layer``'s keys
    in float64. ``step``: Universal Transformers only, ``"all"`` (default there) or one step."""
    shared = edit_site(model, layer).memory.shared
    if not shared and step is not None:
        raise StatsError(f"step={step!r}: only a Universal Transformer's shared MLP has steps; use layer alone")
    if shared:
        step = "all" if step is None else step
        steps = tuple(range(mlp_steps(model))) if step == "all" else (step,)
    else:
        steps = (layer,)
    site = edit_site(model, layer, steps)
    d = site.memory.d_mlp
    total = torch.zeros(d, d, dtype=torch.float64)
    count = n_tokens = 0
    with eval_mode(model) as inner:
        dev = device_of(inner)
        body = find_body(inner)
        stateful = bool(getattr(body, "stateful", False)) and hasattr(inner, "hidden_states")
        state = None
        for batch in batches:
            batch = batch.to(dev)
            got: dict[str, torch.Tensor] = {}

            def grab(act, hook, got=got):
                got[hook.name] = act

            names = [n for n in (*site.key_hooks, *site.active_hooks) if n is not None]
            with hooks(inner, [(n, grab) for n in names]):
                if stateful:
                    state = inner.hidden_states(batch, state).state
                else:
                    lm_logits(inner, batch, False)
            for key_name, active_name in zip(site.key_hooks, site.active_hooks):
                if key_name not in got:  # ACT: every position of the batch halted before this step
                    continue
                k = got[key_name].reshape(-1, d)
                if active_name is not None and active_name in got:
                    k = k[got[active_name].reshape(-1).bool()]
                k = k.double()
                total += (k.T @ k).cpu()
                count += k.shape[0]
            n_tokens += batch.numel()
    moment = total / max(count, 1)
    fp = fingerprint if fingerprint is not None else model_fingerprint(model)
    return KeyStats(moment, count, n_tokens, layer, step if shared else None, corpus, fp)


def stats_path(cache_dir: str | Path, fingerprint: str, corpus: str, layer: int, step, n_tokens: int,
               seq_len: int) -> Path:
    """``<cache_dir>/<fingerprint>/<corpus>/layer{l}[_step{s}]_n{tokens}_T{seq_len}.safetensors``
    (the window length changes the contexts the keys are read in)."""
    at = f"layer{layer}" + ("" if step is None else f"_step{step}")
    return Path(cache_dir) / fingerprint / (corpus or "corpus") / f"{at}_n{n_tokens}_T{seq_len}.safetensors"


def key_stats(model: nn.Module, layer: int, ids: np.ndarray | torch.Tensor | Callable[[], np.ndarray | torch.Tensor],
              *, corpus: str, n_tokens: int, seq_len: int = 128, batch_size: int = 16, step: int | str | None = None,
              cache_dir: str | Path | None = None, max_condition: float = MAX_CONDITION) -> KeyStats:
    """:func:`collect_key_stats` over the first ``n_tokens`` of the token stream ``ids`` (named
    ``corpus``), loaded from / saved to ``cache_dir`` when given, then :meth:`KeyStats.check`.
    ``ids`` may be a function returning the stream: it is called only when the cache misses
    (rebuilding a training corpus can take longer than the statistics themselves)."""
    from safetensors.torch import load_file, save_file

    fp = model_fingerprint(model)
    if edit_site(model, layer).memory.shared and step is None:
        step = "all"
    path = None if cache_dir is None else stats_path(cache_dir, fp, corpus, layer, step, n_tokens, seq_len)
    if path is not None and path.exists():
        data = load_file(str(path))
        stats = KeyStats(data["moment"], int(data["count"]), int(data["n_tokens"]), layer, step, corpus, fp)
    else:
        if callable(ids):
            ids = ids()
        stats = collect_key_stats(model, layer, stream_batches(ids, n_tokens, seq_len, batch_size), step=step,
                                  corpus=corpus, fingerprint=fp)
        stats.check(max_condition)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file({"moment": stats.moment.contiguous(), "count": torch.tensor(stats.count),
                       "n_tokens": torch.tensor(stats.n_tokens)}, str(tmp),
                      metadata={"layer": str(layer), "step": str(step), "corpus": corpus, "fingerprint": fp})
            tmp.replace(path)
    stats.check(max_condition)
    return stats
