"""Execution engines: local (featx.extract) and Ray (featx.engines.ray)."""
