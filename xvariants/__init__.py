"""xvariants: transformer architecture variants behind one model contract.

Import the pieces you need, e.g. ``from xvariants.layers import MultiHeadAttention``;
plain ``torch.nn`` modules, no Lightning or Hydra required.
"""

__version__ = "0.1.0"
