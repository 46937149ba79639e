"""Universal Transformer body (Dehghani et al., 2019): one weight-shared block applied over
depth, with a position and a step signal added at every step; fixed-step or adaptive (ACT).

The loop, the halting unit and the halted-state rules live in :mod:`xvariants.layers.halting`.
Under ``halted_update="freeze"`` (the default) a halted position's state is copied forward and
the others keep attending to it through frozen keys/values, computed once from its final state
plus the signals of the step after it halted (:mod:`xvariants.layers.halting.frozen`). So a
halted position costs nothing after that one key/value projection, and the work per step
follows the number of positions still running (``act_compute="sparse"``: queries, attention
output and the feed-forward run on running positions only, keys/values on running and
just-halted ones). ``act_compute="dense"`` computes every position with the same semantics (the
reference the tests compare against; it is used automatically when a hook listens inside the
shared block or attention maps are requested). Under ``halted_update="t2t"`` halted states keep
being transformed (tensor2tensor), so only whole rows whose positions have all halted are skipped.
"""

from __future__ import annotations

import torch
from torch import nn

from xvariants.config_errors import check_positive_int, config_scope, require
from xvariants.layers.attention import DecodingCache
from xvariants.layers.block import TransformerBlock
from xvariants.layers.halting import AdaptiveHalting, act_arguments, resolve_step_options, run_steps, running_rows
from xvariants.layers.halting.frozen import SparseFreezeStep, StepKV, extend_frozen_cache
from xvariants.layers.hooks import HookPoint
from xvariants.layers.init import init_gpt2
from xvariants.layers.positions import sinusoid_table
from xvariants.layers.steps import SIGNALS, StepHooks, StepSignal, default_signal_scale, step_signal_table
from xvariants.models.contract import AuxOutput, Body, BodyOutput, State
from xvariants.models.registry import register_body


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
    :param halted_update: ACT: ``freeze`` (copy halted states forward; their keys/values frozen
        from the step after halting) or ``t2t`` (keep transforming halted states), see
        :class:`~xvariants.layers.halting.options.ACTOptions`.
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
        check_positive_int(d_model, "model.d_model")
        require(0.0 <= dropout < 1.0, "model.dropout", f"must be in [0, 1), got {dropout}")
        require(step_signal in SIGNALS, "model.step_signal", f"unknown signal {step_signal!r}", SIGNALS)
        require(position_signal in SIGNALS, "model.position_signal", f"unknown signal {position_signal!r}", SIGNALS)
        require(max_positions >= 1, "model.max_positions", f"must be >= 1, got {max_positions}")
        require(position_offset_max >= 0, "model.position_offset_max", f"must be >= 0, got {position_offset_max}")
        require(signal_scale is None or signal_scale >= 0, "model.signal_scale", f"must be >= 0 or null (auto), got {signal_scale}")
        signal_scale = default_signal_scale(init_std, d_model) if signal_scale is None else float(signal_scale)
        if "sinusoidal" in (step_signal, position_signal):
            require(d_model % 2 == 0, "model.d_model", f"sinusoidal signals need an even width, got {d_model}")
        with config_scope("model."):
            n_steps, act_opts = resolve_step_options(act, num_steps, **act_arguments(locals()))
        self.d_model, self.causal, self.norm_first, self.act = d_model, causal, norm_first, act
        self.n_steps = n_steps  # upper bound of the loop
        self.act_compute = act_opts.act_compute if act else "dense"
        self.step_signal, self.position_signal = step_signal, position_signal
        self.max_positions, self.position_offset_max, self.signal_scale = max_positions, position_offset_max, signal_scale
        self.block = TransformerBlock(
            d_model,
            n_heads,
            4 * d_model if d_ff is None else d_ff,
            dropout=dropout,
            attn_dropout=dropout if attn_dropout is None else attn_dropout,
            norm_first=norm_first,
            activation=activation,
            bias=bias,
        )
        self.ln_f = nn.LayerNorm(d_model, bias=bias) if norm_first else nn.Identity()
        self.step_table = nn.Parameter(torch.zeros(self.n_steps, d_model)) if step_signal == "learned" else None
        self.pos_table = nn.Parameter(torch.zeros(max_positions, d_model)) if position_signal == "learned" else None
        self.halting = None if act_opts is None else AdaptiveHalting.from_options(d_model, act_opts, init_std=init_std)
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

    def _signal(self, h: torch.Tensor, start: int = 0) -> StepSignal:
        """The position + step signals of this call; positions count from ``start`` (the length
        of a decoding cache)."""
        B, T, _ = h.shape
        pos = self._position_signal(B, T, h.device, h.dtype, start)
        steps = step_signal_table(self.step_signal, self.n_steps, self.d_model, self.step_table, h.device, h.dtype)
        return StepSignal(pos, steps, self.signal_scale)

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
        signal = self._signal(h, 0 if cache is None else cache.length)
        attentions = [] if return_attention else None
        try:
            out, aux = self._run(h, signal, padding_mask, attentions, cache)
        finally:
            self.current_step = None
        aux.attentions = attentions
        return BodyOutput(self.ln_f(self.hook_act_output(out)), None, aux)

    def _run(self, h, signal: StepSignal, padding_mask, attentions, cache) -> tuple[torch.Tensor, AuxOutput]:
        halting = self.halting
        freeze = halting is not None and halting.halted_update == "freeze"
        dense = (
            cache is not None  # decoding: usually one token, the dense reference loop with the past keys
            or self.act_compute == "dense"
            or attentions is not None
            or any(m.has_hooks() for m in self._block_hooks)
        )
        if freeze and not dense and not any(m.has_hooks() for m in self._state_hooks):
            sparse = SparseFreezeStep(self.block, signal, padding_mask, self.causal, h)

            def step_fn(x, n, running):
                self.current_step = n
                return sparse(x, n, running)

        else:
            step_fn = _DenseStep(self, signal, padding_mask, attentions, cache, freeze, dense)
        x, res = run_steps(step_fn, h, self.n_steps, halting=halting, padding_mask=padding_mask, step_hooks=self.steps)
        if res is None:
            return x, AuxOutput()
        if cache is not None:
            extend_frozen_cache(cache, step_fn.kv_steps, step_fn.prev_running, res.state, signal, self.block)
        return res.output, AuxOutput(**halting.report(res))

    def new_cache(self) -> DecodingCache | None:
        """Per-step key/value caches for incremental decoding (causal; under ACT with frozen
        halted states). Every step's cache holds every token, so all have the same length."""
        if not self.causal or (self.act and self.halting.halted_update != "freeze"):
            return None
        return DecodingCache(self.n_steps)

    def extra_repr(self) -> str:
        mode = f"act(max_steps={self.n_steps})" if self.act else f"num_steps={self.n_steps}"
        return f"{mode}, causal={self.causal}, step_signal={self.step_signal}, position_signal={self.position_signal}"


class _DenseStep:
    """One step of the shared block on every position (fixed-step mode, the dense ACT
    reference, decoding); under ACT "freeze" the keys/values of halted positions are the frozen
    ones (:class:`StepKV`), under "t2t" rows whose positions have all halted are skipped."""

    def __init__(self, body: UniversalBody, signal, padding_mask, attentions, cache, freeze: bool, dense: bool):
        self.body, self.signal, self.padding_mask = body, signal, padding_mask
        self.attentions, self.cache, self.freeze, self.dense = attentions, cache, freeze, dense
        self.frozen = self.prev_running = None
        self.kv_steps: list = []  # what each step exposed (for the decoding cache)

    def __call__(self, x: torch.Tensor, n: int, running: torch.Tensor | None):
        body, pm = self.body, self.padding_mask
        body.current_step = n
        z = body.steps[n].hook_resid_pre(self.signal(x, n))
        need = self.attentions is not None
        if running is not None and not (self.dense or self.freeze):  # t2t: skip finished rows
            rows = running_rows(running)
            if rows is None:
                new = body.block(z, causal=body.causal, key_padding_mask=pm)[0]
            else:
                out = body.block(z[rows], causal=body.causal, key_padding_mask=None if pm is None else pm[rows])[0]
                new = x.index_copy(0, rows, out.to(x.dtype))
            self.prev_running = running
            return z, new
        past = None if self.cache is None else self.cache.layers[n]  # each step attends to its own keys
        if running is None or not self.freeze:
            kv = past
        else:
            refresh = None if n == 0 else self.prev_running
            frozen = self.frozen
            if refresh is not None and bool(refresh.all()):
                frozen = refresh = None  # nothing frozen yet: no merge needed
            kv = StepKV(frozen, refresh, past)
        new, w = body.block(z, causal=body.causal, key_padding_mask=pm, kv_cache=kv, need_weights=need)
        if isinstance(kv, StepKV):
            self.frozen = (kv.k, kv.v)
            self.kv_steps.append(self.frozen)
        if need:
            self.attentions.append(w)
        self.prev_running = running
        return z, new
