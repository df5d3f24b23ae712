"""twinvol: replicated block storage served over NBD."""

__version__ = "0.1.0"
