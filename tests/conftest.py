"""Shared fixtures live in tests/fixtures_*.py, one module per area, so areas can grow independently."""

from pathlib import Path

pytest_plugins = sorted(f"tests.{p.stem}" for p in Path(__file__).parent.glob("fixtures_*.py"))
