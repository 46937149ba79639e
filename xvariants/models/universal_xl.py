"""Universal Transformer-XL with adaptive halting: one weight-shared Transformer-XL layer
(relative attention, segment memory) applied over depth, with per-position ACT.

Composition of :mod:`xvariants.models.universal` (recurrence over depth, step signal, ACT via
:class:`~xvariants.layers.halting.AdaptiveHalting`) and :mod:`xvariants.models.xl`
(:class:`~xvariants.models.xl.XLLayer`, relative positions, :mod:`xvariants.layers.memory`):

* positions come only from the relative attention (no absolute signal); the step signal
  is added at every step, as in the universal body;
* memory per depth step: the state is a list of ``max_steps`` (``num_steps``) tensors
  ``[B, M, D]``; entry ``n`` holds what the positions of earlier segments presented to
  attention at step ``n`` (the input of step ``n``). Under ``halted_update="freeze"`` a
  position that halted before step ``n`` presents its frozen state there (plus the step
  signal of the step after it halted), exactly what it presents to its own segment. Under
  ``"t2t"`` every position's state is transformed at every step (a halted one too), and
  entry ``n`` holds that state plus step ``n``'s signal. Either way reading a sequence in
  segments with enough memory equals reading it in one piece (tested for both);
* halting is per position within each segment; the loop stops when every position of the
  segment has halted, and the memory entries of the steps it did not run are completed
  (under "t2t" by applying the block to the halted states, which costs the full
  ``max_steps``). Relative attention needs every query of a row (rel-shift), so under
  "freeze" this body saves work by skipping rows whose positions have all halted, not
  single positions; under "t2t" every row runs every step it keeps in memory.
"""

from __future__ import annotations


import torch
from torch import nn

from xvariants.config_errors import ConfigError, check_positive_int, config_scope, require
from xvariants.layers.halting import AdaptiveHalting, act_arguments, resolve_step_options, run_steps, running_rows
from xvariants.layers.hooks import HookPoint
from xvariants.layers.memory import SegmentMemory
from xvariants.layers.steps import SIGNALS as STEP_SIGNALS
from xvariants.layers.steps import StepHooks, StepSignal, default_signal_scale, step_signal_table
from xvariants.models.contract import AuxOutput, BodyOutput, State
from xvariants.models.memory_body import SegmentMemoryBody
from xvariants.models.registry import register_body
from xvariants.models.xl import XLLayer, init_transformer_xl


@register_body("universal_xl")
class UniversalXLBody(SegmentMemoryBody):
    """One shared :class:`XLLayer` applied ``num_steps`` times or adaptively (ACT), with
    relative attention and segment memory per depth step.

    :param d_model: model width. :param n_heads: heads. :param mem_len: positions kept in
        memory per step (0 = none; changeable after construction like the xl body).
    :param d_head: width per head. :param d_ff: feed-forward width (default ``4 * d_model``).
    :param dropout: dropout (as the xl body). :param attn_dropout: attention dropout.
    :param clamp_len: relative distances above it use R[clamp_len]; -1 = off.
    :param same_length: every query attends to ``mem_len`` keys.
    :param norm_first: pre-LN (final LayerNorm added) or post-LN (xl default).
    :param init_std: N(0, std) init (Transformer-XL's scheme).
    :param num_steps, act, max_steps, act_epsilon, ponder_weight, ponder_warmup_steps,
        halting_bias_init, halting_warmup_steps, halted_update, act_weighting,
        halting_logit_scale: as in the universal body.
    :param step_signal: ``sinusoidal``, ``learned`` or ``none``. :param signal_scale: its
        multiplier; None = ``init_std * sqrt(2 d)`` as in the universal body.
    """

    owns_positions = True

    @config_scope("model.")
    def __init__(
        self,
        d_model: int,
        n_heads: int,
        mem_len: int,
        d_head: int | None = None,
        d_ff: int | None = None,
        dropout: float = 0.1,
        attn_dropout: float = 0.0,
        clamp_len: int = -1,
        same_length: bool = False,
        norm_first: bool = True,
        causal: bool = True,
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
        halting_logit_scale: float | None = None,
        step_signal: str = "sinusoidal",
        signal_scale: float | None = None,
    ):
        super().__init__()
        require(
            isinstance(d_model, int) and d_model >= 2 and d_model % 2 == 0,
            "model.d_model",
            f"must be an even integer >= 2 (relative sinusoids), got {d_model}",
        )
        if not causal:
            raise ConfigError(
                "model.causal", "the universal_xl body is a decoder: segment memory and relative attention are causal", ["true"]
            )
        check_positive_int(n_heads, "model.n_heads")
        if d_head is None:
            require(d_model % n_heads == 0, "model.n_heads", f"d_model={d_model} is not divisible by n_heads={n_heads}")
            d_head = d_model // n_heads
        for name, p in (("dropout", dropout), ("attn_dropout", attn_dropout)):
            require(0.0 <= p < 1.0, f"model.{name}", f"must be in [0, 1), got {p}")
        require(step_signal in STEP_SIGNALS, "model.step_signal", f"unknown signal {step_signal!r}", STEP_SIGNALS)
        require(signal_scale is None or signal_scale >= 0, "model.signal_scale", f"must be >= 0 or null (auto), got {signal_scale}")
        signal_scale = default_signal_scale(init_std, d_model) if signal_scale is None else float(signal_scale)
        with config_scope("model."):
            n_steps, act_opts = resolve_step_options(act, num_steps, **act_arguments(locals()))
        self.d_model, self.causal, self.act, self.n_steps = d_model, True, act, n_steps
        self.norm_first, self.step_signal, self.signal_scale = norm_first, step_signal, signal_scale
        self.memory = SegmentMemory(n_steps, d_model, mem_len=mem_len, clamp_len=clamp_len, same_length=same_length)
        self.block = XLLayer(
            d_model,
            n_heads,
            d_head,
            4 * d_model if d_ff is None else d_ff,
            dropout=dropout,
            attn_dropout=attn_dropout,
            norm_first=norm_first,
            own_biases=True,
        )
        self.drop = nn.Dropout(dropout)
        self.ln_f = nn.LayerNorm(d_model) if norm_first else nn.Identity()
        self.step_table = nn.Parameter(torch.zeros(n_steps, d_model)) if step_signal == "learned" else None
        self.halting = None if act_opts is None else AdaptiveHalting.from_options(d_model, act_opts, init_std=init_std)
        self.steps = nn.ModuleList(StepHooks() for _ in range(n_steps))
        self.hook_act_output = HookPoint()
        self.hook_pos = HookPoint()
        self.current_step: int | None = None
        init_transformer_xl(self, init_std)
        if self.step_table is not None:
            nn.init.normal_(self.step_table, std=0.5**0.5)
        if self.halting is not None:
            self.halting.reset_parameters()

    def extra_repr(self) -> str:
        mode = f"act(max_steps={self.n_steps})" if self.act else f"num_steps={self.n_steps}"
        return f"{mode}, mem_len={self.mem_len}, clamp_len={self.clamp_len}, step_signal={self.step_signal}"

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
        if cache is not None:
            raise ValueError("the universal_xl body carries context in its memory (`state`), not in a decoding cache")
        seg = self.begin_segment(state, h, padding_mask)
        mems, allowed = seg.mems, seg.allowed
        r = self.hook_pos(self.drop(seg.r))
        table = step_signal_table(self.step_signal, self.n_steps, self.d_model, self.step_table, h.device, h.dtype)
        signal = StepSignal(None, None if table is None else table.to(h.dtype), self.signal_scale)
        attentions = [] if return_attention else None
        freeze = self.halting is None or self.halting.halted_update == "freeze"
        inputs: list[torch.Tensor] = []  # what each step presents to attention (memory entries)
        book = {"prev_running": None}

        def step_fn(x: torch.Tensor, n: int, running: torch.Tensor | None):
            self.current_step = n
            z = self.steps[n].hook_resid_pre(signal(x, n))
            src = z
            if freeze and n > 0 and book["prev_running"] is not None:
                # halted positions keep presenting the input of the step after they halted
                src = torch.where(book["prev_running"][..., None], z, inputs[-1])
            inputs.append(src)
            mem = None if mems is None else mems[n]
            # skip rows whose positions have all halted; not under t2t, where a halted state keeps
            # changing and the memory must hold it for the next segment, and not when attention maps
            # are asked for, which must cover every row (as the universal body goes dense for them)
            rows = None if running is None or not freeze or attentions is not None else running_rows(running)
            if rows is None:
                new, w = self._run_block(src, r, mem, allowed, attentions is not None)
            else:
                sub_allowed = allowed if allowed.size(0) == 1 else allowed[rows]
                sub_mem = None if mem is None else mem[rows]
                out, w = self._run_block(src[rows], r, sub_mem, sub_allowed, attentions is not None)
                new = x.index_copy(0, rows, out)
            if attentions is not None:
                attentions.append(w)
            book["prev_running"] = running
            return z, new

        try:
            x, res = run_steps(
                step_fn, h, self.n_steps, halting=self.halting, padding_mask=padding_mask, step_hooks=self.steps
            )
            out, aux = (x, AuxOutput()) if res is None else (res.output, AuxOutput(**self.halting.report(res)))
            # steps the loop did not need (every position has halted): what each position would
            # present there. Under t2t the states keep being transformed, so that reading a
            # sequence in segments equals reading it in one piece (where later positions may run).
            for n in range(len(inputs), self.n_steps):
                z = signal(x, n)
                prev = book["prev_running"]
                if freeze:
                    inputs.append(z if prev is None or n == 0 else torch.where(prev[..., None], z, inputs[-1]))
                    book["prev_running"] = torch.zeros_like(prev) if prev is not None else None
                else:
                    inputs.append(z)
                    if n + 1 < self.n_steps:
                        self.current_step = n
                        x = self._run_block(z, r, None if mems is None else mems[n], allowed, False)[0]
        finally:
            self.current_step = None
        new_state = self.memory.update(seg, inputs)
        aux.attentions = attentions
        return BodyOutput(self.drop(self.ln_f(self.hook_act_output(out))), new_state, aux)

    def _run_block(self, src, r, mem, allowed, need_weights):
        blk = self.block
        return blk(src, r, mem=mem, u=blk.attn.r_w_bias, v=blk.attn.r_r_bias, allowed=allowed, need_weights=need_weights)
