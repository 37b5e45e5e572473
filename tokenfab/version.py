"""The package version (importable from any floor without loading the engine)."""

__version__ = "0.1.0"
