"""Shipped YAML training configs (package data)."""
