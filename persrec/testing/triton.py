"""Pytest fixtures (placeholder until implemented)."""
