"""The package version, written once: ``pyproject.toml`` reads it (``tool.setuptools.dynamic``) and
``deqgen.__version__`` re-exports it."""

__version__ = "0.1.0"
