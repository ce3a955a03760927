"""jpatch's version: the one definition (pyproject.toml reads it). Imports nothing."""

__version__ = "0.1.0"
