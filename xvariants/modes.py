"""Train/eval mode for a block of code, put back module by module.

``model.train(was)`` on the way out would set every submodule to the root's old mode, so a
submodule that was deliberately in eval mode (a Hugging Face model inside a freshly built
adapter, which is in train mode as every new ``nn.Module`` is) would come back in train mode
with its dropout on. :func:`eval_modes` records each module's own flag and restores exactly it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eval_modes(module: nn.Module) -> Iterator[nn.Module]:
    """``module.eval()`` for the block (no dropout, no ACT warm-up), then every submodule back
    to the mode it had, exceptions included.

    :param module: the module tree to switch; yielded back.
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, was in modes:
            m.training = was
