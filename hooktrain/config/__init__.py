"""Recipes as data: the recipe record, its overrides, the registry and config.json."""
