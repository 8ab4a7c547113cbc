"""Integrations with other libraries (imported on demand: they are optional dependencies)."""
