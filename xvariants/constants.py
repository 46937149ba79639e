"""Values several packages must agree on, defined once."""

from __future__ import annotations

#: target id that is not scored (PyTorch's ``cross_entropy`` default ``ignore_index``)
IGNORE_INDEX = -100

#: units whose per-token loss in bits is a standard figure, and what that figure is called
BIT_UNITS = {"byte": "bits per byte", "char": "bits per character"}
