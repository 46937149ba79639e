"""Universal Transformer body (Dehghani et al., 2019): one weight-shared block applied over
depth, with a position and a step signal added at every step; fixed-step or adaptive (ACT).

Freezing and attention (``halted_update="freeze"``, the default). A halted position's state is
copied forward unchanged and the others keep attending to it. Its keys and values are frozen
too: they are computed once, from its final state plus the signals of the step after it halted,
and reused at every later step. So a halted position costs nothing after that one key/value
projection, and the work per step follows the number of positions still running
(``act_compute="sparse"``: queries, attention output and the feed-forward run on running
positions only, keys/values on running and just-halted ones). ``act_compute="dense"`` computes
every position with the same semantics (the reference the tests compare against; it is used
automatically when a hook listens inside the shared block or attention maps are requested).
Under ``halted_update="t2t"`` halted states keep being transformed (tensor2tensor), so only whole
rows whose positions have all halted are skipped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xvariants.config_errors import ConfigError, require
from xvariants.layers.attention import DecodingCache, KVCache
from xvariants.layers.block import TransformerBlock
from xvariants.layers.halting import DEFAULT_HALTING_BIAS, AdaptiveHalting
from xvariants.layers.hooks import HookPoint
from xvariants.layers.init import init_gpt2
from xvariants.layers.positions import sinusoid_table
from xvariants.models.contract import AuxOutput, Body, BodyOutput, State
from xvariants.models.registry import register_body

SIGNALS = ("sinusoidal", "learned", "none")
ACT_COMPUTE = ("sparse", "dense")
#: ACT-only options and their defaults (None in the constructor = "not set")
ACT_DEFAULTS = {
    "max_steps": 8,
    "act_epsilon": 0.01,
    "ponder_weight": 0.01,
    "ponder_warmup_steps": 0,
    "halting_warmup_steps": 0,
    "halting_bias_init": DEFAULT_HALTING_BIAS,
    "halted_update": "freeze",
    "act_weighting": "graves",
    "act_compute": "sparse",
    "halting_logit_scale": 1.0,
}
DEFAULT_NUM_STEPS = 6


def default_signal_scale(init_std: float, d_model: int) -> float:
    """Multiplier giving signal components the rms of a sqrt(d)-scaled initial embedding."""
    return init_std * (2.0 * d_model) ** 0.5


def resolve_act_options(
    act: bool, num_steps: int | None, d_model: int, init_std: float, **act_opts
) -> tuple[int, AdaptiveHalting | None, dict]:
    """Check the step options of a universal body; returns (loop bound, the halting unit or
    None, ACT options with defaults).

    ACT options (``max_steps``, ``act_epsilon``, ...) default to None = "not set": setting one
    without ``act=true`` is an error, and so is ``num_steps`` with ``act=true``. The halting unit
    validates the ACT options itself, naming ``model.<option>``.
    """
    if not act:
        for name, value in act_opts.items():
            if value is not None:
                raise ConfigError(
                    f"model.{name}",
                    f"is an ACT option and needs act=true (fixed-step mode counts steps with num_steps; got {name}={value!r})",
                )
        num_steps = DEFAULT_NUM_STEPS if num_steps is None else num_steps
        require(
            isinstance(num_steps, int) and not isinstance(num_steps, bool) and num_steps >= 1,
            "model.num_steps",
            f"must be an integer >= 1, got {num_steps!r}",
        )
        return num_steps, None, {}
    if num_steps is not None:
        raise ConfigError(
            "model.num_steps",
            f"fixes the step count, which ACT decides per position: set max_steps instead (got num_steps={num_steps})",
        )
    opts = {k: ACT_DEFAULTS[k] if v is None else v for k, v in act_opts.items()}
    if "act_compute" in opts:
        require(opts["act_compute"] in ACT_COMPUTE, "model.act_compute", f"unknown mode {opts['act_compute']!r}", ACT_COMPUTE)
    halting = AdaptiveHalting(
        d_model,
        max_steps=opts["max_steps"],
        epsilon=opts["act_epsilon"],
        halting_bias_init=opts["halting_bias_init"],
        weighting=opts["act_weighting"],
        halted_update=opts["halted_update"],
        ponder_weight=opts["ponder_weight"],
        ponder_warmup_steps=opts["ponder_warmup_steps"],
        halting_warmup_steps=opts["halting_warmup_steps"],
        init_std=init_std,
        halting_logit_scale=opts["halting_logit_scale"],
        field_prefix="model.",
    )
    return opts["max_steps"], halting, opts


def act_aux(halting: AdaptiveHalting, res) -> AuxOutput:
    """Aux output of an ACT loop: weighted ponder cost (loss), statistics, per-position maps."""
    maps = {
        "n_updates": res.n_updates.detach(),
        "remainders": res.remainders.detach(),
        "halting_probs": res.halting_probs.detach().permute(1, 2, 0),  # [B, T, steps run]
        "step_weights": res.step_weights.detach().permute(1, 2, 0),
    }
    losses = {"ponder_cost": halting.current_ponder_weight() * res.ponder_cost}
    return AuxOutput(losses=losses, stats=halting.statistics(res), maps=maps)


class StepHooks(nn.Module):
    """Hook points of one application step ``steps.{n}`` (TransformerLens-style names).

    ``hook_resid_pre``: the step input (state + position + step signal) ``[B, T, D]``;
    ``hook_resid_post``: the state after the step (halted positions copied) ``[B, T, D]``;
    ``hook_halting_prob``: p ``[B, T]`` (ACT); ``hook_active``: running mask ``[B, T]`` (ACT).
    The shared block's own hooks (``block.attn.hook_pattern`` ...) fire at every step too;
    ``body.current_step`` tells a hook function which step it is in.
    """

    def __init__(self) -> None:
        super().__init__()
        self.hook_resid_pre = HookPoint()
        self.hook_resid_post = HookPoint()
        self.hook_halting_prob = HookPoint()
        self.hook_active = HookPoint()


class _StepKV:
    """Duck-typed KV cache for one dense step: keys/values of positions in ``refresh`` come
    from this step, the others keep the frozen values of earlier steps. With ``past`` (this
    step's decoding cache) the attention also sees the earlier tokens' keys/values; ``k`` /
    ``v`` keep only this call's positions."""

    def __init__(
        self, frozen: tuple[torch.Tensor, torch.Tensor] | None, refresh: torch.Tensor | None, past: KVCache | None = None
    ):
        self.frozen, self.refresh, self.past = frozen, refresh, past
        self.k = self.v = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.frozen is not None:
            m = self.refresh[:, None, :, None]  # [B, 1, T, 1] against [B, H, T, Dh]
            k, v = torch.where(m, k, self.frozen[0].to(k.dtype)), torch.where(m, v, self.frozen[1].to(v.dtype))
        self.k, self.v = k, v
        if self.past is not None and self.past.k is not None:
            return torch.cat([self.past.k, k], dim=2), torch.cat([self.past.v, v], dim=2)
        return k, v


@register_body("universal")
class UniversalBody(Body):
    """One shared :class:`TransformerBlock` applied ``num_steps`` times, or adaptively (ACT).

    :param d_model: model width. :param n_heads: attention heads. :param d_ff: feed-forward
        width (default ``4 * d_model``). :param dropout: residual dropout. :param attn_dropout:
        attention dropout (default ``dropout``). :param causal: decoder (True) or encoder.
    :param norm_first: pre-LN (final LayerNorm added) or post-LN. :param activation, bias,
        init_std: as in the vanilla body.
    :param num_steps: fixed-step mode: steps to apply (default 6); not with ``act``.
    :param act: adaptive halting per position (Graves ACT, :class:`AdaptiveHalting`).
    :param max_steps: ACT: most steps (default 8). :param act_epsilon: ACT: threshold 1 - eps
        (default 0.01). :param ponder_weight: ACT: weight of ``mean(N + R)`` (default 0.01).
    :param ponder_warmup_steps: ACT: linear warm-up of the ponder weight (training forwards).
    :param halting_bias_init: ACT: initial halting bias (default -3, see docs/universal-transformer.md).
    :param halting_warmup_steps: ACT: training forwards during which the halting unit is not
        trained (every position runs max_steps from the deep start).
    :param halted_update: ACT: ``freeze`` (paper) or ``t2t`` (keep transforming halted states).
    :param act_weighting: ACT: ``graves`` (weights sum to 1) or ``t2t`` (interpolation).
    :param act_compute: ACT: ``sparse`` (work only for running positions) or ``dense``.
    :param halting_logit_scale: ACT: multiplier of ``w . s`` in the halting logit (default 1).
    :param step_signal: ``sinusoidal`` (paper), ``learned`` (tensor2tensor) or ``none``.
    :param position_signal: ``sinusoidal``, ``learned`` or ``none``; added at every step.
    :param max_positions: length limit of learned position signals.
    :param position_offset_max: in training, shift each row's positions by a random offset in
        ``[0, position_offset_max]`` (t2t's ``position_start_index="random"``, for length
        generalisation); 0 = off.
    :param signal_scale: multiplier of the position + step signals (learned tables start at the
        sinusoids' scale, per-component rms 1/sqrt(2)). None (default): ``init_std * sqrt(2 d)``,
        so that each component has the rms of an initial token embedding scaled by sqrt(d)
        (``embed_scale: true``); 1.0 is the paper's unscaled sum, which drowns the tokens of an
        embedding initialised with std 0.02.
    """

    owns_positions = True

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int | None = None,
        dropout: float = 0.1,
        attn_dropout: float | None = None,
        causal: bool = True,
        norm_first: bool = True,
        activation: str = "gelu",
        bias: bool = True,
        init_std: float = 0.02,
        num_steps: int | None = None,
        act: bool = False,
        max_steps: int | None = None,
        act_epsilon: float | None = None,
        ponder_weight: float | None = None,
        ponder_warmup_steps: int | None = None,
        halting_bias_init: float | None = None,
        halting_warmup_steps: int | None = None,
        halted_update: str | None = None,
        act_weighting: str | None = None,
        act_compute: str | None = None,
        halting_logit_scale: float | None = None,
        step_signal: str = "sinusoidal",
        position_signal: str = "sinusoidal",
        max_positions: int = 1024,
        position_offset_max: int = 0,
        signal_scale: float | None = None,
    ):
        super().__init__()
        require(d_model >= 1, "model.d_model", f"must be >= 1, got {d_model}")
        require(0.0 <= dropout < 1.0, "model.dropout", f"must be in [0, 1), got {dropout}")
        require(step_signal in SIGNALS, "model.step_signal", f"unknown signal {step_signal!r}", SIGNALS)
        require(position_signal in SIGNALS, "model.position_signal", f"unknown signal {position_signal!r}", SIGNALS)
        require(max_positions >= 1, "model.max_positions", f"must be >= 1, got {max_positions}")
        require(position_offset_max >= 0, "model.position_offset_max", f"must be >= 0, got {position_offset_max}")
        require(signal_scale is None or signal_scale >= 0, "model.signal_scale", f"must be >= 0 or null (auto), got {signal_scale}")
        signal_scale = default_signal_scale(init_std, d_model) if signal_scale is None else float(signal_scale)
        if "sinusoidal" in (step_signal, position_signal):
            require(d_model % 2 == 0, "model.d_model", f"sinusoidal signals need an even width, got {d_model}")
        n_steps, halting, act_opts = resolve_act_options(
            act,
            num_steps,
            d_model,
            init_std,
            max_steps=max_steps,
            act_epsilon=act_epsilon,
            ponder_weight=ponder_weight,
            ponder_warmup_steps=ponder_warmup_steps,
            halting_bias_init=halting_bias_init,
            halting_warmup_steps=halting_warmup_steps,
            halted_update=halted_update,
            act_weighting=act_weighting,
            act_compute=act_compute,
            halting_logit_scale=halting_logit_scale,
        )
        self.d_model, self.causal, self.norm_first, self.act = d_model, causal, norm_first, act
        self.n_steps = n_steps  # upper bound of the loop
        self.act_compute = act_opts["act_compute"] if act else "dense"
        self.step_signal, self.position_signal = step_signal, position_signal
        self.max_positions, self.position_offset_max, self.signal_scale = max_positions, position_offset_max, signal_scale
        self.block = TransformerBlock(
            d_model,
            n_heads,
            d_ff or 4 * d_model,
            dropout=dropout,
            attn_dropout=dropout if attn_dropout is None else attn_dropout,
            norm_first=norm_first,
            activation=activation,
            bias=bias,
        )
        self.ln_f = nn.LayerNorm(d_model, bias=bias) if norm_first else nn.Identity()
        self.step_table = nn.Parameter(torch.zeros(self.n_steps, d_model)) if step_signal == "learned" else None
        self.pos_table = nn.Parameter(torch.zeros(max_positions, d_model)) if position_signal == "learned" else None
        self.halting = halting
        self.steps = nn.ModuleList(StepHooks() for _ in range(self.n_steps))
        self.hook_act_output = HookPoint()
        self.current_step: int | None = None
        init_gpt2(self, self.n_steps, std=init_std)
        for table in (self.step_table, self.pos_table):
            if table is not None:
                nn.init.normal_(table, std=0.5**0.5)  # the rms of a sinusoid component
        if self.halting is not None:
            self.halting.reset_parameters()  # init_gpt2 zeroed its bias
        self._block_hooks = [m for m in self.block.modules() if isinstance(m, HookPoint)]
        # per-step state hooks want full [B, T, D] tensors: the sparse loop falls back to dense steps
        self._state_hooks = [m for hk in self.steps for m in (hk.hook_resid_pre, hk.hook_resid_post)]

    # ------------------------------------------------------------------ signals
    def _position_signal(self, B: int, T: int, device, dtype, start: int = 0) -> torch.Tensor | None:
        if self.position_signal == "none":
            return None
        offset = None
        if self.training and self.position_offset_max > 0:
            offset = torch.randint(0, self.position_offset_max + 1, (B, 1), device=device)
        pos = torch.arange(start, start + T, device=device)[None, :]
        if offset is not None:
            pos = pos + offset
        if self.position_signal == "sinusoidal":
            return sinusoid_table(pos.reshape(-1), self.d_model).view(pos.size(0), T, self.d_model).to(dtype)
        last = int(pos.max()) + 1
        if last > self.max_positions:
            raise ValueError(
                f"sequence reaches position {last} but learned position signals stop at max_positions="
                f"{self.max_positions}; raise model.max_positions or use position_signal=sinusoidal"
            )
        return self.pos_table[pos]

    def _step_signals(self, device, dtype) -> torch.Tensor | None:
        if self.step_signal == "none":
            return None
        if self.step_signal == "learned":
            return self.step_table
        return sinusoid_table(torch.arange(self.n_steps, device=device), self.d_model).to(dtype)

    def _signal_parts(self, h: torch.Tensor, start: int = 0):
        """(position signal ``[1 or B, T, D]`` or None, step signals ``[S, D]`` or None, scale);
        positions count from ``start`` (the length of a decoding cache)."""
        B, T, _ = h.shape
        pos = self._position_signal(B, T, h.device, h.dtype, start)
        return pos, self._step_signals(h.device, h.dtype), self.signal_scale

    @staticmethod
    def _signal_fn(parts):
        pos, steps, scale = parts

        def signal(x: torch.Tensor, n: int) -> torch.Tensor:
            if pos is None and steps is None:
                return x
            if pos is None:
                return x + scale * steps[n]
            sig = pos if steps is None else pos + steps[n]  # [1 or B, T, D]: one add on the batch
            return x + (sig if scale == 1.0 else scale * sig)

        return signal

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        h: torch.Tensor,
        state: State | None = None,
        *,
        padding_mask: torch.Tensor | None = None,
        cache=None,
        return_attention: bool = False,
    ) -> BodyOutput:
        if state is not None:
            raise ValueError("the universal body is stateless: pass state=None")
        if cache is not None and self.new_cache() is None:
            raise ValueError(
                "this universal body has no decoding cache: it needs a causal body, and under ACT "
                "halted_update='freeze' (with 't2t' a halted state keeps changing at every later step)"
            )
        if padding_mask is not None and padding_mask.shape != h.shape[:2]:
            raise ValueError(f"padding_mask must be [B, T] = {tuple(h.shape[:2])}, got {tuple(padding_mask.shape)}")
        parts = self._signal_parts(h, 0 if cache is None else cache.length)
        attentions = [] if return_attention else None
        try:
            if not self.act:
                out, aux = self._fixed(h, self._signal_fn(parts), padding_mask, attentions, cache), AuxOutput()
            else:
                out, aux = self._adaptive(h, parts, padding_mask, attentions, cache)
        finally:
            self.current_step = None
        aux.attentions = attentions
        return BodyOutput(self.ln_f(self.hook_act_output(out)), None, aux)

    def _fixed(self, h, signal, padding_mask, attentions, cache=None) -> torch.Tensor:
        x = h
        for n in range(self.n_steps):
            self.current_step = n
            z = self.steps[n].hook_resid_pre(signal(x, n))
            x, w = self.block(
                z,
                causal=self.causal,
                key_padding_mask=padding_mask,
                kv_cache=None if cache is None else cache.layers[n],  # each step attends to its own keys
                need_weights=attentions is not None,
            )
            x = self.steps[n].hook_resid_post(x)
            if attentions is not None:
                attentions.append(w)
        return x

    def _adaptive(self, h, parts, padding_mask, attentions, cache=None) -> tuple[torch.Tensor, AuxOutput]:
        halting = self.halting
        freeze = halting.halted_update == "freeze"
        dense = (
            cache is not None  # decoding: usually one token, the dense reference loop with the past keys
            or self.act_compute == "dense"
            or attentions is not None
            or any(m.has_hooks() for m in self._block_hooks)
        )
        if freeze and not dense and not any(m.has_hooks() for m in self._state_hooks):
            res = self._sparse_freeze_loop(h, parts, padding_mask)
            return res.output, act_aux(halting, res)
        signal = self._signal_fn(parts)
        kv: dict = {"frozen": None, "prev_running": None, "steps": []}

        def step_fn(x: torch.Tensor, n: int, running: torch.Tensor):
            self.current_step = n
            hooks = self.steps[n]
            z = hooks.hook_resid_pre(signal(x, n))
            refresh = None if n == 0 else kv["prev_running"]
            all_running = bool(running.all())
            if dense or freeze:  # (the sparse freeze loop handles the rest; here: reference semantics)
                # dense step (also when every position runs: nothing to skip, no gathering needed)
                frozen = kv["frozen"]
                if refresh is not None and bool(refresh.all()):
                    frozen = refresh = None  # nothing frozen yet: no merge needed
                step_kv = _StepKV(frozen, refresh, None if cache is None else cache.layers[n]) if freeze else None
                new, w = self.block(
                    z, causal=self.causal, key_padding_mask=padding_mask, kv_cache=step_kv, need_weights=attentions is not None
                )
                if freeze:
                    kv["frozen"] = (step_kv.k, step_kv.v)
                    kv["steps"].append(kv["frozen"])
                if attentions is not None:
                    attentions.append(w)
            else:
                new = self._sparse_rows_step(x, z, running, padding_mask)
            kv["prev_running"] = running
            if freeze and not all_running:
                new = torch.where(running.unsqueeze(-1), new, x)
            return z, hooks.hook_resid_post(new)

        res = halting(step_fn, h, padding_mask, step_hooks=self.steps)
        if cache is not None:
            self._extend_cache(cache, kv["steps"], kv["prev_running"], res.state, signal)
        return res.output, act_aux(halting, res)

    @torch.no_grad()
    def _extend_cache(self, cache: DecodingCache, step_kv: list, last_running: torch.Tensor, state, signal) -> None:
        """Append this call's keys/values to every step's cache. Steps the loop ran store what
        the tokens exposed there; later steps store each token's frozen keys/values: for a
        token that halted at the last step run, computed now from its final state plus the next
        step's signal (what a later, longer-running token will attend to), for the others the
        frozen values it already had."""
        ran = len(step_kv)
        for n in range(ran):
            cache.layers[n].append(*step_kv[n])
        if ran == self.n_steps:
            return
        z = signal(state, ran)
        a = self.block.ln1(z) if self.block.norm_first else z
        attn, D = self.block.attn, self.d_model
        bias = None if attn.qkv.bias is None else attn.qkv.bias[D:]
        k, v = F.linear(a, attn.qkv.weight[D:], bias).view(*a.shape[:2], 2, attn.n_heads, attn.d_head).unbind(2)
        m = last_running[:, None, :, None]
        k = torch.where(m, k.transpose(1, 2), step_kv[-1][0])
        v = torch.where(m, v.transpose(1, 2), step_kv[-1][1])
        for n in range(ran, self.n_steps):
            cache.layers[n].append(k, v)

    # ------------------------------------------------------------------ sparse steps
    def _sparse_rows_step(self, x, z, running, padding_mask) -> torch.Tensor:
        """t2t update: every position of a row that still runs is transformed; rows whose
        positions have all halted are skipped (their output no longer changes)."""
        rows = running.any(1).nonzero().squeeze(1)
        if rows.numel() == x.size(0):
            return self.block(z, causal=self.causal, key_padding_mask=padding_mask)[0]
        pm = None if padding_mask is None else padding_mask[rows]
        out = self.block(z[rows], causal=self.causal, key_padding_mask=pm)[0]
        return x.index_copy(0, rows, out.to(x.dtype))

    def _sparse_freeze_loop(self, h, parts, padding_mask):
        """ACT under "freeze" with work only where something changes: per step, keys/values for
        the positions whose state changed at the previous step (every real position at step 0),
        queries, attention output, feed-forward and halting probability for the running
        positions (packed per row, finished rows dropped), states and output updated in place
        at those positions. Same results as the dense reference (tested)."""
        halting, blk = self.halting, self.block
        attn = blk.attn
        pos, steps, scale = parts
        B, T, D = h.shape
        H, Dh = attn.n_heads, attn.d_head
        pre = blk.norm_first
        # query rows and the fused key/value rows of the shared QKV projection (views, no copy)
        wq, wkv = attn.qkv.weight[:D], attn.qkv.weight[D:]
        bq, bkv = (None, None) if attn.qkv.bias is None else (attn.qkv.bias[:D], attn.qkv.bias[D:])
        grad = torch.is_grad_enabled()
        p_drop = attn.dropout if self.training else 0.0
        dev = h.device

        step_sig: dict[int, torch.Tensor | float] = {}

        def signal_at(n, b, t):  # signal of step n at positions (b, t): one gather from a per-step table
            if n not in step_sig:
                sig = pos if steps is None else (steps[n] if pos is None else pos + steps[n])
                step_sig.clear()
                step_sig[n] = 0.0 if sig is None else (sig if scale == 1.0 else scale * sig)
            sig = step_sig[n]
            if isinstance(sig, float) or sig.dim() == 1:
                return sig
            return sig[b, t] if sig.size(0) > 1 else sig[0, t]

        hs = halting.start(h, padding_mask)
        x, shared = h.clone(), False
        kvbuf = h.new_zeros(B, T, 2 * D)  # keys | values of every position, as last computed
        dense_kv = None  # keys/values of the last all-running step, merged into kvbuf only if a sparse step follows
        refresh = hs.real
        kpos = torch.arange(T, device=dev)[None, None, :]
        for n in range(self.n_steps):
            running = hs.running
            if not bool(running.any()):
                break
            self.current_step = n
            hooks = self.steps[n]
            running = hooks.hook_active(halting.hook_active(running))
            if bool(running.all()):  # nothing halted yet: one plain block call, keys/values captured
                z = x + signal_at(n, slice(None), slice(None)) if pos is not None or steps is not None else x
                cache = _StepKV(None, None)
                new, _ = blk(z, causal=self.causal, kv_cache=cache)
                dense_kv = (cache.k, cache.v)
                p = hooks.hook_halting_prob(halting.hook_halting_prob(halting.halting_prob(z)))
                halting.update(hs, p, new)
                x, refresh, shared = new, running, True
                continue
            if shared and grad:  # autograd saved that block output for the output sum: update a copy
                x, shared = x.clone(), False
            put = (lambda t, i, v: t.index_put(i, v)) if grad else (lambda t, i, v: t.index_put_(i, v))
            if dense_kv is not None:
                kvbuf = torch.cat([t.transpose(1, 2).reshape(B, T, D) for t in dense_kv], dim=-1)
                dense_kv = None
            # 1. keys/values of the positions whose state changed at the previous step
            rb, rt = refresh.nonzero(as_tuple=True)
            zr = x[rb, rt] + signal_at(n, rb, rt)
            ar = blk.ln1(zr) if pre else zr
            kvbuf = put(kvbuf, (rb, rt), F.linear(ar, wkv, bkv).to(kvbuf.dtype))
            # 2. queries of the running positions, packed per row: [Ba, Q]
            row_any = running.any(1)
            every_row = bool(row_any.all())
            rows = torch.arange(B, device=dev) if every_row else row_any.nonzero().squeeze(1)
            run = running if every_row else running[rows]
            counts = run.sum(1)
            Q = int(counts.max())
            order = torch.argsort((~run).to(torch.uint8), dim=1, stable=True)[:, :Q]  # running positions first
            valid = torch.arange(Q, device=dev)[None, :] < counts[:, None]
            Ba = rows.numel()
            qb = rows[:, None].expand(Ba, Q)
            # inputs, LayerNorm and query projection on the running positions only (flat), then
            # placed into the packed [Ba, Q] layout attention needs (empty slots stay zero)
            slots = valid.nonzero(as_tuple=True)
            index = (qb[slots], order[slots])
            zf = x[index] + signal_at(n, *index)  # [N, D]
            qf = F.linear(blk.ln1(zf) if pre else zf, wq, bq)
            q = qf.new_zeros(Ba, Q, D).index_put(slots, qf).view(Ba, Q, H, Dh).transpose(1, 2)
            kv = kvbuf if every_row else kvbuf[rows]
            k, v = (t.view(Ba, T, H, Dh).transpose(1, 2) for t in (kv[..., :D], kv[..., D:]))
            qpos = order[:, :, None]
            allowed = (kpos <= qpos) if self.causal else None
            if padding_mask is not None:
                keep = ~(padding_mask if every_row else padding_mask[rows])[:, None, :]
                allowed = keep if allowed is None else allowed & keep
                allowed = allowed | (kpos == qpos)  # a query always sees itself
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None if allowed is None else allowed[:, None], dropout_p=p_drop
            )
            af = attn.out(y.transpose(1, 2).reshape(Ba, Q, D)[slots])
            # 3. residuals, feed-forward and halting probability of the running positions (flat)
            if pre:
                x1 = zf + blk.drop(af)
                x2 = x1 + blk.drop(blk.mlp(blk.ln2(x1)))
            else:
                x1 = blk.ln1(zf + blk.drop(af))
                x2 = blk.ln2(x1 + blk.drop(blk.mlp(x1)))
            p = torch.zeros(B, T, dtype=zf.dtype, device=dev).index_put(index, halting.halting_prob(zf))
            p = hooks.hook_halting_prob(halting.hook_halting_prob(p))
            x2 = x2.to(x.dtype)
            halting.update(hs, p, x2, index=index)
            x = x.index_put_(index, x2)
            refresh = running
        self.current_step = None
        if self.training:
            halting.tick()
        return halting.result(hs, x)

    def new_cache(self) -> DecodingCache | None:
        """Per-step key/value caches for incremental decoding (causal; under ACT with frozen
        halted states). Every step's cache holds every token, so all have the same length."""
        if not self.causal or (self.act and self.halting.halted_update != "freeze"):
            return None
        return DecodingCache(self.n_steps)

    def extra_repr(self) -> str:
        mode = f"act(max_steps={self.n_steps})" if self.act else f"num_steps={self.n_steps}"
        return f"{mode}, causal={self.causal}, step_signal={self.step_signal}, position_signal={self.position_signal}"
