"""Prefect flows and the CLI. The only package that imports Prefect; nothing imports this package."""
