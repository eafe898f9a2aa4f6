"""Runnable recipes (outside the library package: they print, parse arguments and set up logging)."""
