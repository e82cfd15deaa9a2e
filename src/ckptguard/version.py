"""The package version (one place; the manifest and environment record it)."""

__version__ = "0.1.0"
