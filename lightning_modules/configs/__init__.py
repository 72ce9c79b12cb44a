"""Shipped YAML training configs (package data): ``CONFIG_DIR / "synthetic32.yaml"``."""

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
