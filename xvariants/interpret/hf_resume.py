"""The :class:`~xvariants.interpret.resume.Resumer` of the Hugging Face adapter
(:class:`~xvariants.interpret.hf_causal.HookedCausalLM`).

The checkpoint is the library's own forward with its key/value cache on. To resume, the decoder
layers are called one by one with the arguments the library's base model gives them, obtained
by letting the base model prepare a call on the suffix (its causal mask against the cached
prefix, position ids, rotary tables) and stopping it at the first layer; those arguments are
built for one row so that they broadcast over however many rows a layer gets. That relies on
the base model giving every layer the same arguments besides the hidden state, which holds for
the GPT-2 and Llama layouts; models with per-layer attention types (``config.layer_types``
mixing sliding and full attention) or post-processed logits (soft-capping, logit scales) get
no resumer and take the plain path.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import torch

from xvariants.interpret.resume import LayerCheckpoint, Resumer

if TYPE_CHECKING:
    from xvariants.interpret.hf_causal import HookedCausalLM


class _Stop(Exception):
    pass


def _first(output):
    return output[0] if isinstance(output, tuple) else output


class HFResumer(Resumer):
    """:param lm: the adapter. NotImplementedError when its layout cannot be resumed (see the module doc)."""

    def __init__(self, lm: HookedCausalLM):
        from xvariants.interpret.hf_causal import _is_norm

        self.lm, self.n_layers = lm, lm.n_layers
        config, self.base = lm.hf.config, lm.hf.base_model
        kinds = set(getattr(config, "layer_types", None) or ())
        if len(kinds) > 1:
            raise NotImplementedError(f"layers of several attention types {sorted(kinds)} get different masks")
        for attr in ("final_logit_softcapping", "logit_scale", "logit_softcapping"):
            if getattr(config, attr, None) not in (None, 1, 1.0):
                raise NotImplementedError(f"logits are post-processed ({attr})")
        norms = [m for m in self.base.children() if _is_norm(m)]
        if len(norms) != 1:
            raise NotImplementedError(f"{type(self.base).__name__}: expected one final norm, found {len(norms)}")
        self.norm, self.head = norms[0], lm.hf.get_output_embeddings()
        params = inspect.signature(self.base.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        from transformers import DynamicCache

        self.cache_type = DynamicCache

    def checkpoint(self, tokens: torch.Tensor) -> LayerCheckpoint:
        inputs: dict[int, torch.Tensor] = {}
        self.lm._record_inputs = inputs
        try:
            out = self.base(input_ids=tokens, use_cache=True)
        finally:
            self.lm._record_inputs = None
            self.lm._resid_pre.clear()
        cache = out.get("cache", None)
        cache = out.get("past_key_values", None) if cache is None else cache
        kv = [(k, v) for k, v, *_ in cache]
        return LayerCheckpoint(self.head(out.last_hidden_state[:, -1]), [inputs[j] for j in range(self.n_layers)], kv)

    def begin(self, ckpt, rows_at, token):
        cache = None
        if token > 0:
            # a layer no row reaches still gets one row: the library reads the prefix length
            # (positions, mask) from layer 0, and an empty tensor counts as no prefix
            some = rows_at[-1][:1]
            cache = self.cache_type([(k[r, :, :token], v[r, :, :token]) for (k, v), rows in zip(ckpt.kv, rows_at)
                                     for r in [rows if rows.numel() else some]])
        T, D = ckpt.inputs[0].shape[1:]
        captured: dict = {}

        def grab(module, args, kwargs):
            captured["args"], captured["kwargs"] = args, kwargs
            raise _Stop

        # prepended: it stops the call before the adapter's own hooks see the placeholder input
        handle = self.lm.layers[0].register_forward_pre_hook(grab, with_kwargs=True, prepend=True)
        self.lm._silent = True
        try:
            placeholder = ckpt.inputs[0].new_zeros(1, T - token, D)
            self.base(inputs_embeds=placeholder, use_cache=cache is not None, **{self.cache_arg: cache})
        except _Stop:
            pass
        finally:
            handle.remove()
            self.lm._silent = False
        if "kwargs" not in captured:
            raise RuntimeError("the base model never called its first decoder layer")
        return captured["args"], captured["kwargs"]

    def layer(self, j, h, state):
        args, kwargs = state
        try:
            if args:
                return _first(self.lm.layers[j](h, *args[1:], **kwargs))
            return _first(self.lm.layers[j](**{**kwargs, "hidden_states": h}))
        finally:
            self.lm._resid_pre.clear()

    def logits(self, h_last):
        return self.head(self.norm(h_last))
