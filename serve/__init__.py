"""veil.serve: placeholder package; its issue has not landed yet."""
