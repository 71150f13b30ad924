"""Operator dashboard: static assets served by the query API."""

from pathlib import Path

STATIC_DIR = Path(__file__).resolve().parent / "static"
