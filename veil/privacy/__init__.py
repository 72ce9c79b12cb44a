"""Privacy bookkeeping for private attribute edits, with no torch (the server imports it).

    mechanism  randomized response on binary attributes (keep probability e^eps / (1 + e^eps))
    levels     the named privacy levels low | medium | high | max, each an (epsilon, strength) pair
    ledger     the SQLite release ledger: every release, per-image composition, the budget
    session    EditSession: previews, feedback (more_private | less_private | accept | reject), release
    revision_manifest  dataset revisions: the accepted edits and their manifest (numpy and PIL only)

The serving path imports these while running only numpy and ONNX Runtime, so nothing here may
import torch (a test imports each module in a fresh interpreter and checks); the edit itself is injected (see ``session.EditFn``). Import the submodules directly:

    from veil.privacy.session import EditSession
"""
