"""The package version (kept equal to pyproject.toml's; the server reports it)."""

__version__ = "0.1.0"
