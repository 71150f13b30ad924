"""Composition package: settings, client factories, local stack, CLI and process supervision."""
