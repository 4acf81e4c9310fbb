"""wtbox's version (pyproject.toml's), in a module of its own: a box records it (fleet/fingerprint.py),
and importing the package for it would be an import cycle."""

__version__ = "0.1.0"
