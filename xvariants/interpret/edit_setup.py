"""What the ``edit`` and ``edit_eval`` commands (and ``bench/editing_facts.py``) share: the
model and where it came from, the edit method with its layers, the key statistics of those
layers and the editor that applies a method to a list of requests.

Statistics (``stats=auto``) come from the model's own training text: a checkpoint's data
config is rebuilt (:func:`xvariants.loading.build_datamodule`) and its train split streamed;
a Hugging Face model reads WikiText-2 (as ROME reads Wikipedia). They are cached by
:func:`xvariants.editing.key_stats` (model fingerprint, layer, corpus, count), and the corpus is
rebuilt only on a cache miss.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from xvariants.errors import UsageError
from xvariants.interpret.cli_args import as_int, as_number, load_checkpoint_model

METHODS = ("rome", "memit", "ft")
#: the options every editing command reads (beside its own)
EDIT_OPTIONS = {"ckpt_path", "hf_model", "name", "method", "layer", "layers", "key_step", "stats", "stats_tokens",
                "stats_cache", "lambda"}
#: streamed when ``stats_tokens`` is not given (or the whole corpus, if shorter); ROME streams
#: 100k Wikipedia samples of up to 1,024 tokens, far more than a facts corpus holds
DEFAULT_STATS_TOKENS = 100_000
DEFAULT_STATS_CACHE = ".cache/xvariants/key_stats"
#: MEMIT's λ for GPT-J (d_mlp 16,384); ``lambda=auto`` keeps λ / d_mlp at GPT-J's ratio: λ = 15,000
#: does nothing to a model of d_mlp 512, λ ≈ 470 there edits (λ·C weighs against KKᵀ, and the
#: squared norm of a key grows with d_mlp)
GPTJ_LAMBDA, GPTJ_D_MLP = 15000.0, 16384


@dataclass(frozen=True)
class EditSettings:
    """The checked method options (the ``edit --help`` text names them).

    :param method: ``rome``, ``memit``, ``ft`` or ``none`` (edit_eval's unedited baseline).
    :param layers: the edited layers (ROME/FT: one), None = :func:`default_layers`.
    :param key_step: Universal Transformers, ROME: an int step, ``peak`` or ``mean``.
    :param stats: ``auto`` or a text file. :param stats_tokens: None = up to DEFAULT_STATS_TOKENS.
    :param stats_cache: folder of the statistics cache (None: no cache).
    :param mom2_weight: MEMIT's λ (None: ``auto``).
    """

    method: str = "rome"
    layers: tuple[int, ...] | None = None
    key_step: int | str | None = None
    stats: str = "auto"
    stats_tokens: int | None = None
    stats_cache: Path | None = Path(DEFAULT_STATS_CACHE)
    mom2_weight: float | None = None


def _int_list(text: str, key: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or any(v < 0 for v in values):
        raise UsageError(f"{key}: expected a layer index or a comma-separated list of them (0, 1, ...), got {text!r}")
    return values


def edit_settings(opts: dict[str, str], allow_none: bool = False) -> EditSettings:
    """Every method option checked before a model is loaded (one message each)."""
    methods = (*METHODS, "none") if allow_none else METHODS
    method = opts.get("method", "rome")
    if method not in methods:
        raise UsageError(f"method: expected {', '.join(methods)}, got {method!r}")
    layers = None
    if "layer" in opts and "layers" in opts:
        raise UsageError("give layer=N (one layer) or layers=A,B (MEMIT's layer set), not both")
    if "layer" in opts or "layers" in opts:
        key = "layer" if "layer" in opts else "layers"
        layers = _int_list(opts[key], key)
        if method == "none":
            raise UsageError(f"{key}=: method=none edits nothing")
        if method in ("rome", "ft") and len(layers) > 1:
            raise UsageError(f"{key}={opts[key]}: {method.upper()} edits one layer; several are MEMIT's (method=memit)")
        if list(layers) != sorted(set(layers)):
            raise UsageError(f"{key}: list the layers ascending without repeats, got {opts[key]!r}")
    key_step = opts.get("key_step")
    if key_step is not None:
        if method != "rome":
            raise UsageError("key_step=: only ROME chooses the step of a Universal Transformer's keys (method=rome)")
        if key_step not in ("peak", "mean"):
            if not key_step.strip().isdigit():
                raise UsageError(f"key_step: expected peak, mean or a step index (0, 1, ...), got {key_step!r}")
            key_step = int(key_step)
    stats = opts.get("stats", "auto")
    if stats != "auto" and not Path(stats).is_file():
        raise UsageError(f"stats: expected auto or a text file, and {stats} is not a file")
    stats_tokens = as_int(opts, "stats_tokens", None)
    cache = opts.get("stats_cache", DEFAULT_STATS_CACHE)
    mom2_weight = None
    if opts.get("lambda", "auto") != "auto":
        if method != "memit":
            raise UsageError("lambda=: only MEMIT weighs its update against λ·C (method=memit)")
        mom2_weight = as_number(opts, "lambda", 0.0)
        if mom2_weight <= 0:
            raise UsageError(f"lambda: expected a number > 0 or auto, got {opts['lambda']!r}")
    return EditSettings(method, layers, key_step, stats, stats_tokens, None if cache == "none" else Path(cache),
                        mom2_weight)


# ---------------------------------------------------------------------- the model
@dataclass
class EditSource:
    """A model to edit with what it reads and where it came from.

    :param hparams: a checkpoint's hyper-parameters (None for a Hugging Face model).
    :param ckpt_path: the checkpoint file (None for a Hugging Face model).
    """

    model: Any
    tokenizer: Any
    name: str
    hparams: dict | None = None
    ckpt_path: str | None = None

    @property
    def counterfact(self) -> str | None:
        """The CounterFact-style file a ``data=facts`` checkpoint recorded, else None."""
        files = ((self.hparams or {}).get("data_meta") or {}).get("facts_files") or {}
        return files.get("counterfact")


def load_edit_source(opts: dict[str, str]) -> EditSource:
    from xvariants.interpret.trace_cli import run_name

    if "ckpt_path" in opts:
        model, tokenizer, hp = load_checkpoint_model(opts["ckpt_path"])
        return EditSource(model, tokenizer, opts.get("name") or run_name(opts["ckpt_path"]), hp, opts["ckpt_path"])
    from xvariants.interpret.hf_causal import load_hf_causal_lm

    model, tokenizer = load_hf_causal_lm(opts["hf_model"])
    return EditSource(model, tokenizer, opts.get("name") or model.xv_name)


def default_layers(method: str, n_layers: int) -> tuple[int, ...]:
    """ROME/FT: a third of the way up (ROME edits layer 17 of GPT-2 XL's 48; a causal trace tells
    the best one); MEMIT: that layer and the one below (MEMIT spreads GPT-J's edits over 3-8)."""
    layer = n_layers // 3
    return (max(layer - 1, 0), layer) if method == "memit" and layer > 0 else (layer,)


def resolve_layers(settings: EditSettings, model) -> tuple[int, ...]:
    """The layers to edit, each checked against the model (out of range: one message)."""
    from xvariants.editing import EditError
    from xvariants.editing.runs import edit_site, mlp_steps

    layers = settings.layers or default_layers(settings.method, max(mlp_steps(model), 1))
    try:
        for layer in layers:
            edit_site(model, layer)
    except EditError as e:
        raise UsageError(str(e)) from None
    return layers


# ---------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class StatsCorpus:
    """The text keys are streamed over: a cache name, its length when known without building
    it, and how to build its token ids."""

    name: str
    description: str
    n_tokens: int | None
    ids: Callable[[], np.ndarray]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:12]


WHERE_DATA = "set XVARIANTS_DATA_DIR to the data folder it was trained with, or give stats=PATH"


def training_corpus(source: EditSource) -> StatsCorpus:
    """A checkpoint's train split, rebuilt from its data config (only when called for)."""
    hp = source.hparams or {}
    if not hp.get("data"):
        raise UsageError(f"stats=auto: {source.ckpt_path} records no data config to rebuild its training text from; "
                         "give stats=PATH (a text file like the training data)")
    meta = hp.get("data_meta") or {}
    corpus = meta.get("corpus") or hp["data"].get("corpus", {}).get("name", "corpus")
    digest = ((meta.get("text_sha256") or {}).get("train") or "")[:12]

    def ids() -> np.ndarray:
        from xvariants.data.corpora.base import CorpusNotFoundError
        from xvariants.loading import build_datamodule

        data = {**hp["data"], "corpus": dict(hp["data"].get("corpus") or {})}
        if data["corpus"].get("mix") == "auto" and meta.get("mix"):
            # "auto" takes the first filler found from here; another one would be another text
            data["corpus"]["mix"] = meta["mix"]
        try:
            dm = build_datamodule(data, hp.get("tokenizer_state"))
            dm.setup("fit")
        except CorpusNotFoundError as e:
            raise UsageError(f"stats=auto: cannot rebuild the training text of {source.ckpt_path} from here ({e}); "
                             f"{WHERE_DATA}") from None
        rebuilt = (dm.meta.get("text_sha256") or {}).get("train", "")
        if digest and not rebuilt.startswith(digest):
            raise UsageError(f"stats=auto: the rebuilt training text of {source.ckpt_path} is not the one it was "
                             f"trained on (sha256 {rebuilt[:12]}, recorded {digest}); {WHERE_DATA}")
        return np.array(dm.tokens("train"))  # a writable copy of the read-only memmap

    known = (meta.get("tokens") or {}).get("train")
    name = f"{corpus}-train" + (f"-{digest}" if digest else "")
    return StatsCorpus(name, f"the training text ({corpus}, train split)", int(known) if known else None, ids)


def stats_corpus(source: EditSource, spec: str) -> StatsCorpus:
    """``stats=auto``: the training text of a checkpoint, WikiText-2 for a Hugging Face model;
    ``stats=PATH``: that text file, encoded with the model's tokenizer."""
    if spec == "auto" and source.ckpt_path is not None:
        return training_corpus(source)
    if spec == "auto":
        from xvariants.data.corpora.facts import load_filler

        text = load_filler("wikitext2", None)[1]["train"]
        name, description = "wikitext2-train", "WikiText-2"
    else:
        text = Path(spec).read_text(encoding="utf-8")
        name, description = f"{Path(spec).stem}-{_digest(text)}", spec
    ids = np.asarray(source.tokenizer.encode(text), dtype=np.int64)
    return StatsCorpus(name, description, len(ids), lambda: ids)


def stats_for(source: EditSource, settings: EditSettings, layers: tuple[int, ...],
              step: int | str | None = None) -> tuple[dict, dict[str, Any]]:
    """``({layer: KeyStats}, description)``; too few tokens or an ill-conditioned C: one message."""
    from xvariants.editing import StatsError, key_stats

    corpus = stats_corpus(source, settings.stats)
    built: dict[str, np.ndarray] = {}

    def ids() -> np.ndarray:  # built once for all layers, and only on a cache miss
        if "ids" not in built:
            built["ids"] = corpus.ids()
        return built["ids"]

    available = corpus.n_tokens
    wanted = settings.stats_tokens
    if available is None and wanted is None:  # the default count needs the length
        available = len(ids())
    if available is not None and wanted is not None and wanted > available:
        raise UsageError(f"stats_tokens={wanted}: {corpus.description} has only {available} tokens")
    n = wanted or min(DEFAULT_STATS_TOKENS, available)
    limit = getattr(source.model, "max_context", None) or 128
    seq_len = min(int(((source.hparams or {}).get("data") or {}).get("seq_len") or 128), limit)

    from xvariants.editing.runs import edit_site

    # a Universal Transformer's steps share one weight and so one C (keys pooled over steps)
    shared = edit_site(source.model, layers[0]).memory.shared
    t0 = time.perf_counter()
    try:
        stats = {}
        for layer in layers:
            stats[layer] = stats[layers[0]] if shared and stats else key_stats(
                source.model, layer, ids, corpus=corpus.name, n_tokens=n, seq_len=seq_len, step=step,
                cache_dir=settings.stats_cache)
    except StatsError as e:
        raise UsageError(f"{e} (stats_tokens=N sets the count; stats=PATH another text)") from None
    info = {"corpus": corpus.description, "cache_name": corpus.name, "n_tokens": n, "seq_len": seq_len,
            "keys": {layer: s.count for layer, s in stats.items()}, "corpus_built": bool(built),
            "seconds": time.perf_counter() - t0,
            "cache": None if settings.stats_cache is None else str(settings.stats_cache)}
    return stats, info


# ---------------------------------------------------------------------- the editor
def mom2_weight(settings: EditSettings, d_mlp: int) -> float:
    """MEMIT's λ: as given, or GPT-J's λ scaled to this model's d_mlp (``lambda=auto``)."""
    return settings.mom2_weight if settings.mom2_weight is not None else GPTJ_LAMBDA * d_mlp / GPTJ_D_MLP


def make_editor(source: EditSource, settings: EditSettings, layers: tuple[int, ...], stats: dict | None,
                sequential: bool = False) -> tuple[Callable, dict[str, Any]]:
    """``(editor, options used)`` for :func:`xvariants.editing.tables.run_table` and ``edit``:
    ROME one request at a time (several: one after another), MEMIT and FT-L all requests at once
    unless ``sequential``."""
    from xvariants.editing import FTOptions, MEMITOptions, ROMEOptions, ft_edit, memit_edit, rome_edit
    from xvariants.editing.runs import edit_site
    from xvariants.editing.tables import at_once
    from xvariants.editing.tables import sequential as one_by_one

    model, tok = source.model, source.tokenizer
    if settings.method == "rome":
        opts = replace(ROMEOptions(), key_step=settings.key_step)
        return one_by_one(lambda r: rome_edit(model, tok, r, layer=layers[0], stats=stats[layers[0]], options=opts)), \
            {"layer": layers[0], "key_step": settings.key_step}
    if settings.method == "memit":
        lam = mom2_weight(settings, edit_site(model, layers[-1]).memory.d_mlp)
        opts = MEMITOptions(mom2_update_weight=lam)

        def many(requests):
            return memit_edit(model, tok, requests, layers=list(layers), stats=stats, options=opts)

        editor = one_by_one(lambda r: many([r])) if sequential else at_once(many)
        return editor, {"layers": list(layers), "lambda": lam}
    if settings.method == "ft":
        opts = FTOptions()

        def tune(requests):
            return ft_edit(model, tok, requests, layer=layers[0], options=opts)

        return (one_by_one(lambda r: tune([r])) if sequential else at_once(tune)), \
            {"layer": layers[0], "norm_constraint": opts.norm_constraint}
    raise UsageError(f"method={settings.method}: nothing to edit with")
