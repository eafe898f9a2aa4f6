"""Bridges to other DEQ libraries (opt-in imports)."""
