"""Small timing helpers shared by the bench scripts.

* :func:`machine_info` - what the numbers were measured on.
* :func:`train_step_fn` - one training step (forward + loss + backward + optimizer step).
* :func:`interleaved_rounds` - time several implementations in alternating rounds
  (A B, B A, A B, ...) so that load from other processes hits all of them alike; report
  medians over rounds and per-round ratios measured side by side.
* :class:`PeakMemory` / :func:`run_probe` - peak memory, measured in
  a fresh subprocess per configuration (CPU: peak resident set size; CUDA: max allocated).
* :func:`write_results` - JSON + markdown next to each other.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

MiB = 1024 * 1024


# ---------------------------------------------------------------- environment
def pick_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    try:
        info["load_avg_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- timing
def train_step_fn(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable[[], torch.Tensor]):
    """A closure running one training step: zero grads, ``loss_fn()`` (forward + loss),
    backward, optimizer step. Returns the loss tensor (not synchronised)."""

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def time_steps(step: Callable[[], torch.Tensor], n: int, device: torch.device) -> tuple[float, float]:
    """``(wall seconds, process CPU seconds)`` for ``n`` consecutive steps (synchronised at both
    ends). CPU time counts only this process's threads, so on a machine shared with other
    jobs it is far less sensitive to their load than wall time (it still sees their cache and
    memory-bandwidth pressure); with several threads it includes their spin-waiting."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        step()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def warm_up(steps: dict[str, Callable[[], torch.Tensor]], n: int, device: torch.device) -> dict[str, float]:
    """Run each step ``n`` times (first call may compile); returns the wall seconds each took."""
    return {name: time_steps(fn, n, device)[0] if n > 0 else 0.0 for name, fn in steps.items()}


def interleaved_rounds(
    steps: dict[str, Callable[[], torch.Tensor]],
    *,
    rounds: int,
    steps_per_round: int,
    device: torch.device,
) -> dict[str, dict[str, list[float]]]:
    """Seconds per step of each implementation in each round, ``{"wall": {name: [...]},
    "cpu": {name: [...]}}``. The order is reversed every other round (A B, B A, ...) so that
    slow drift of the machine's load cancels."""
    names = list(steps)
    out: dict[str, dict[str, list[float]]] = {"wall": {n: [] for n in names}, "cpu": {n: [] for n in names}}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            wall, cpu = time_steps(steps[name], steps_per_round, device)
            out["wall"][name].append(wall / steps_per_round)
            out["cpu"][name].append(cpu / steps_per_round)
    return out


def _ratio_stats(per_step: dict[str, list[float]], tokens_per_step: int, ours: str, theirs: str) -> dict:
    tps = {n: [tokens_per_step / s for s in v] for n, v in per_step.items()}
    out = {"tokens_per_s": {n: statistics.median(v) for n, v in tps.items()}}
    if ours in tps and theirs in tps:
        ratios = [a / b for a, b in zip(tps[ours], tps[theirs])]
        out.update(
            ratio_median=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios), ratio_per_round=ratios
        )
    return out


def summarize(times: dict[str, dict[str, list[float]]], tokens_per_step: int, ours: str, theirs: str) -> dict:
    """From :func:`interleaved_rounds`: median tokens/s of each and the median (and range) of
    the per-round ratio ours/theirs, by wall time (top level) and by CPU time (``"cpu"``)."""
    out = _ratio_stats(times["wall"], tokens_per_step, ours, theirs)
    out["cpu"] = _ratio_stats(times["cpu"], tokens_per_step, ours, theirs)
    out["seconds_per_step_per_round"] = times
    return out


# ---------------------------------------------------------------- memory
def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (Linux) in bytes, or None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def current_rss_bytes() -> int:
    """Resident set size now (Linux ``VmRSS``; falls back to ``ru_maxrss``)."""
    rss = _status_bytes("VmRSS")
    return rss if rss is not None else max_rss_bytes()


def max_rss_bytes() -> int:
    """Peak resident set size of this process: Linux ``VmHWM`` (reset by :func:`reset_peak_rss`),
    else ``ru_maxrss`` (KiB on Linux, bytes on macOS; note a child process inherits its
    parent's RSS at fork time in ``ru_maxrss``, which ``VmHWM`` avoids)."""
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0: write 5 to ``/proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of what runs inside the ``with`` block, above the level at entry.

    CUDA: ``torch.cuda.max_memory_allocated`` minus the allocated bytes at entry (tensors
    only, not the caching allocator's reserve). CPU: the process's resident-set high-water
    mark (``VmHWM``, reset at entry) minus the RSS at entry - everything the process touched,
    allocator slack included. Run it in a fresh process per configuration
    (:func:`run_probe`) so that freed-but-cached memory of earlier work does not hide the peak.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes: int | None = None
        self.hidden = False

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            gc.collect()
            self.reset = reset_peak_rss()
            self.base = current_rss_bytes()
            self.max_before = max_rss_bytes()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            peak = max_rss_bytes()
            # the high-water mark never rose above an earlier peak: the true peak is hidden
            self.hidden = peak <= self.max_before and self.max_before > self.base
            self.peak_bytes = peak - self.base
        return False

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated minus allocated bytes before building the model (tensors only), fresh process per configuration"
        return (
            "CPU peak resident set size (Linux VmHWM, reset via /proc/self/clear_refs) minus RSS before building the model, "
            "fresh process per configuration"
        )


def run_probe(argv: list[str], timeout: float = 600) -> dict:
    """Run ``python argv...`` in a fresh process; its last stdout line must be a JSON object."""
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"probe {argv} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- output
def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(out: str | Path, payload: dict, markdown: str) -> tuple[Path, Path]:
    """Write ``<out>.json`` and ``<out>.md`` (``out`` without suffix); returns both paths."""
    out = Path(out)
    if out.suffix in (".json", ".md"):
        out = out.with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out.with_suffix(".json"), out.with_suffix(".md")
    jpath.write_text(json.dumps(payload, indent=2) + "\n")
    mpath.write_text(markdown.rstrip() + "\n")
    return jpath, mpath


def command_line() -> str:
    """The command that produced the results, relative to the working directory."""
    return " ".join(["python", *sys.argv])
