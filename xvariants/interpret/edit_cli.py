"""``python -m xvariants.interpret edit key=value ...``: rewrite one fact (ROME, MEMIT or
constrained fine-tuning) and show the model before and after.

Model (one of):
  ckpt_path=PATH         an xvariants checkpoint; its tokenizer encodes the prompts
  hf_model=smollm2-135m  a Hugging Face causal LM (needs the smollm extra)
The fact:
  prompt="{} was born in"  the text up to the object, {} where the subject goes (or a prompt
                         that contains the subject)
  subject="..."          the subject (whole tokens)
  target_new=WORD        the object the edited model should give
  target_true=WORD       the object it gives now (default: its greedy continuation)
Method:
  method=rome|memit|ft   ROME (default), MEMIT, or FT-L (fine-tuning of one MLP output weight
                         within an L-inf bound)
  layer=N | layers=A,B   the edited MLP(s) (default: a third of the way up; MEMIT that layer and
                         the one below); the causal trace (`trace`) shows where a model keeps facts
  key_step=peak|mean|N   Universal Transformers, ROME: the step whose key the edit uses
  lambda=auto|N          MEMIT's λ (auto: GPT-J's 15,000 scaled by d_mlp / 16,384)
Statistics C = E[kkᵀ] (ROME, MEMIT):
  stats=auto|PATH        auto: the checkpoint's training text (its data config, rebuilt), for a
                         Hugging Face model WikiText-2; PATH: a text file
  stats_tokens=N         tokens streamed (default: 100,000 or the whole corpus if shorter)
  stats_cache=DIR|none   cache folder (default .cache/xvariants/key_stats)
Output:
  generate=N             greedy tokens generated from the prompt and "{subject} is" (default 10)
  save=PATH.ckpt|PATH.safetensors   write the edited model (atomically): .ckpt a checkpoint that
                         xvariants.loading.load_model reads (ckpt_path= only), .safetensors the
                         network's weights. Without save= nothing on disk changes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from xvariants.errors import UsageError
from xvariants.interpret.cli_args import as_int, one_source, parse_options
from xvariants.interpret.edit_setup import (
    EDIT_OPTIONS,
    edit_settings,
    load_edit_source,
    make_editor,
    resolve_layers,
    stats_for,
)

KNOWN = EDIT_OPTIONS | {"prompt", "subject", "target_new", "target_true", "generate", "save"}
SAVE_SUFFIXES = (".ckpt", ".safetensors")


def parse(args: list[str]) -> dict[str, str]:
    """The options after ``edit``; everything that needs no model is checked here."""
    opts = parse_options(args, KNOWN, "edit")
    one_source(opts)
    missing = [k for k in ("prompt", "subject", "target_new") if k not in opts]
    if missing:
        raise UsageError(f"{'=, '.join(missing)}= required: the prompt, its subject and the new object")
    edit_settings(opts)
    request_of(opts)
    as_int(opts, "generate", 10, minimum=0)
    save = opts.get("save")
    if save is not None:
        suffix = Path(save).suffix
        if suffix not in SAVE_SUFFIXES:
            raise UsageError(f"save: expected a .ckpt or .safetensors path, got {save!r}")
        if suffix == ".ckpt" and "ckpt_path" not in opts:
            raise UsageError("save=...ckpt writes an xvariants checkpoint (ckpt_path= only); use a .safetensors path")
        if "ckpt_path" in opts and Path(save).resolve() == Path(opts["ckpt_path"]).resolve():
            raise UsageError(f"save={save} would overwrite the checkpoint being edited; give another path")
    return opts


def request_of(opts: dict[str, str]):
    from xvariants.editing import EditError, EditRequest

    try:
        return EditRequest(opts["prompt"], opts["subject"], opts["target_new"], opts.get("target_true"))
    except EditError as e:
        raise UsageError(str(e)) from None


# ---------------------------------------------------------------------- before / after
def probability(model, tokenizer, text: str, target: str) -> float:
    """p(target | text), every token of the target (the product of its token probabilities)."""
    from xvariants.editing import target_nll

    return math.exp(-float(target_nll(model, tokenizer, [text], target, reduce="sum")[0]))


def greedy(model, tokenizer, text: str, n: int) -> str:
    """The greedy continuation of ``text`` (top-1 sampling is argmax decoding)."""
    from xvariants.editing.requests import encode
    from xvariants.editing.runs import decode, sample

    if n == 0:
        return ""
    ids = list(encode(tokenizer, text).ids)
    return decode(tokenizer, sample(model, [ids], n, top_k=1)[0]).strip()


def snapshot(model, tokenizer, request, targets: list[str], n_generate: int) -> dict[str, Any]:
    """Probabilities of the targets after the prompt and greedy generations from the prompt and
    from "{subject} is"."""
    text = request.text()
    prompts = [text, f"{request.subject} is"]
    return {"p": {t: probability(model, tokenizer, text, t) for t in targets},
            "generations": {p: greedy(model, tokenizer, p, n_generate) for p in prompts}}


def true_object(source, request) -> str | None:
    """The object the edit replaces: target_true, or with none given the first word of the
    model's greedy continuation. A target_new the model already gives is refused."""
    from xvariants.editing import EditError
    from xvariants.editing.requests import encode_request
    from xvariants.editing.runs import decode, sample

    try:
        new = encode_request(source.tokenizer, request, target=request.target_new)
        if request.target_true is not None:
            encode_request(source.tokenizer, request, target=request.target_true)
            return request.target_true
    except EditError as e:
        raise UsageError(str(e)) from None
    continuation = sample(source.model, [list(new.ids)], len(new.target), top_k=1)[0]
    if list(continuation) == list(new.target):
        raise UsageError(f"target_new {request.target_new!r} is what the model already gives after "
                         f"{request.text()!r} (the true object); an edit must change the object")
    words = decode(source.tokenizer, continuation).split()
    return words[0] if words else None


# ---------------------------------------------------------------------- saving
def save_model(source, path: str, record: dict[str, Any]) -> str:
    """Write the edited model atomically: a checkpoint ``load_model`` reads (weights and the
    original hyper-parameters; no optimizer state: not for resuming training), or safetensors."""
    from xvariants.interpret.hooks import unwrap_model
    from xvariants.loading import HYPER_PARAMETERS, MODEL_PREFIX, STATE_DICT, atomic_torch_save, safe_load, write_atomic

    inner = unwrap_model(source.model)
    network = getattr(inner, "hf", inner)  # the Hugging Face model's own names inside the adapter
    state = {k: v.detach().cpu() for k, v in network.state_dict().items()}
    if path.endswith(".ckpt"):
        hp = safe_load(source.ckpt_path)[HYPER_PARAMETERS]
        atomic_torch_save({STATE_DICT: {MODEL_PREFIX + k: v for k, v in state.items()}, HYPER_PARAMETERS: hp,
                           "xvariants_edit": record}, path)
        return "checkpoint (xvariants.loading.load_model)"
    from safetensors.torch import save

    # tied weights share storage, which safetensors refuses: each name gets its own copy
    blob = save({k: v.contiguous().clone() for k, v in state.items()}, metadata={"xvariants_edit": json.dumps(record)})
    write_atomic(path, lambda f: f.write(blob))
    return "safetensors (the network's state_dict)"


# ---------------------------------------------------------------------- the command
def run(opts: dict[str, str]) -> dict[str, Any]:
    """Edit one fact, print probabilities and generations before and after, save if asked.
    The model object is restored at the end (a cached Hugging Face model stays unedited)."""
    settings = edit_settings(opts)
    request = request_of(opts)
    n_generate = as_int(opts, "generate", 10, minimum=0)
    source = load_edit_source(opts)
    layers = resolve_layers(settings, source.model)
    truth = true_object(source, request)
    stats, stats_info = (None, None)
    if settings.method in ("rome", "memit"):
        stats, stats_info = stats_for(source, settings, layers)
    editor, used = make_editor(source, settings, layers, stats)
    targets = [request.target_new] + ([truth] if truth else [])
    before = snapshot(source.model, source.tokenizer, request, targets, n_generate)
    from xvariants.editing import EditError

    try:
        results = editor([request])
    except EditError as e:
        raise UsageError(str(e)) from None
    try:
        after = snapshot(source.model, source.tokenizer, request, targets, n_generate)
        record = {"method": settings.method, **used, "prompt": request.prompt, "subject": request.subject,
                  "target_new": request.target_new, "target_true": truth, "source": source.ckpt_path or source.name}
        saved = None
        if "save" in opts:
            saved = save_model(source, opts["save"], record)
    finally:
        for r in reversed(results):
            r.restore()
    seconds = sum(r.info.get("seconds", 0.0) for r in results)
    report = {"model": source.name, "request": record, "stats": stats_info, "before": before, "after": after,
              "edit_seconds": seconds, "saved": None if saved is None else {"path": opts["save"], "format": saved}}
    print_report(report, request)
    return report


def print_report(report: dict[str, Any], request) -> None:
    rec = report["request"]
    where = f"layer {rec['layer']}" if "layer" in rec else f"layers {rec['layers']}"
    print(f"model: {report['model']}")
    print(f"edit: {rec['method'].upper()} at {where}: {request.text()!r} -> {rec['target_new']!r}"
          + (f" (was {rec['target_true']!r})" if rec["target_true"] else ""))
    st = report["stats"]
    if st is not None:
        print(f"statistics: {st['n_tokens']} tokens of {st['corpus']}, windows of {st['seq_len']}, "
              f"{'computed' if st['corpus_built'] else 'from the cache'} in {st['seconds']:.1f} s")
    print(f"edit time: {report['edit_seconds']:.2f} s")
    print(f"{'':24}{'before':>10}{'after':>10}")
    for target, p in report["before"]["p"].items():
        print(f"{'p(' + target + ')':24}{p:>10.4f}{report['after']['p'][target]:>10.4f}")
    print("greedy generations:")
    for prompt, text in report["before"]["generations"].items():
        print(f"  {prompt!r}")
        print(f"    before: {text}")
        print(f"    after:  {report['after']['generations'][prompt]}")
    if report["saved"] is not None:
        print(f"saved: {report['saved']['path']} ({report['saved']['format']})")
    else:
        print("not saved (save=PATH.ckpt|PATH.safetensors writes the edited model)")
