"""``python -m xvariants.interpret <command> key=value ...``

Commands:
  flow    attention flow: trace, rank and draw how attention moves information between tokens
          (``python -m xvariants.interpret flow --help``; :mod:`xvariants.interpret.flow_cli`)
  trace   causal tracing (the ROME paper): where a model keeps a fact, for one prompt or a
          known-facts file (``python -m xvariants.interpret trace --help``;
          :mod:`xvariants.interpret.trace_cli`)
  edit    rewrite one fact (ROME, MEMIT or constrained fine-tuning), show the model before and
          after, optionally save it (:mod:`xvariants.interpret.edit_cli`)
  edit_eval  CounterFact-style tables of many edits: single edits and batches
          (:mod:`xvariants.interpret.edit_eval_cli`)

A bad option or input ends as one ``error:`` line and exit status 2; a missing optional extra
(the Hugging Face models) as exit status 3.
"""

from __future__ import annotations

import sys

from xvariants.errors import UsageError, report

HELP = ("-h", "--help", "help")


def _commands() -> dict:
    # imported here: ``--help`` and a mistyped command answer without loading torch-heavy modules
    from xvariants.interpret import edit_cli, edit_eval_cli, flow_cli, trace_cli

    return {"flow": flow_cli, "trace": trace_cli, "edit": edit_cli, "edit_eval": edit_eval_cli}


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (0, 2 for a user error, 3 for a missing extra)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in HELP:
        print(__doc__)
        return 0 if argv else 2
    try:
        commands = _commands()
        command = commands.get(argv[0])
        if command is None:
            raise UsageError(f"unknown command {argv[0]!r}; the commands are {' and '.join(f'`{c}`' for c in commands)}\n\n{__doc__}")
        if len(argv) > 1 and argv[1] in HELP:
            print(command.__doc__)
            return 0
        command.run(command.parse(argv[1:]))
    except ImportError as e:  # an optional extra (``interpret``, ``smollm``) is not installed
        print(f"error: {e}", file=sys.stderr)
        return 3
    except Exception as e:  # noqa: BLE001 - report() re-raises whatever is not a user error
        return report(e)
    return 0
