"""Shared fixtures. Tests that need infrastructure say so with a marker:
`kafka` (a broker, started here), `clickhouse` (the embedded engine), `e2e`
(pipeline processes). Each run uses its own topics and database."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_CONFIG = ROOT / "deploy" / "example.toml"
