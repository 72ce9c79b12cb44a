"""veil.serve: ``veil serve``, private preview edits over HTTP on an ONNX Runtime export (no torch).

``app`` (the FastAPI routes), ``batcher`` (micro-batching on one worker thread), ``state`` (sessions,
feedback and releases in SQLite or PostgreSQL), ``images`` (uploads), ``schemas``, ``errors``, ``metrics``.
See docs/serve.md.
"""
