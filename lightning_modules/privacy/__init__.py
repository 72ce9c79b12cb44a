"""Privacy bookkeeping for private attribute edits, in plain Python (no torch, no numpy needed).

    mechanism  randomized response on binary attributes (keep probability e^eps / (1 + e^eps))
    levels     the named privacy levels low | medium | high | max, each an (epsilon, strength) pair
    ledger     the SQLite release ledger: every release, per-image composition, the budget
    session    EditSession: previews, feedback (more_private | less_private | accept | reject), release

The serving path imports these while running only numpy and ONNX Runtime, so nothing here may
import torch; the edit itself is injected (see ``session.EditFn``). Import the submodules directly:

    from veil.lightning_modules.privacy.session import EditSession
"""
