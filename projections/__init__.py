"""Projection consumers that materialize PostgreSQL read models from the log."""
