"""veil.export: placeholder package; its issue has not landed yet."""
