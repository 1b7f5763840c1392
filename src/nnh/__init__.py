"""nnh: a PyTorch model's whole life on a pure functional core.

The functional core (``nnh.core``) is pure: state records in, state records out.
The :class:`NNHandler` shell threads those records through loops, DDP collectives,
callbacks and checkpoint files.
"""

__version__ = "0.1.0"
