"""Privacy bookkeeping for private attribute edits, with no torch (the server imports it).

    mechanism  randomized response on binary attributes (keep probability e^eps / (1 + e^eps))
    levels     the named privacy levels low | medium | high | max, each an (epsilon, strength) pair
    db         the one database layer: SQLite or PostgreSQL, one transaction() API, locks, the DDL translation
    accounting the price of a release (labels and pixels) and its composition per record (dp-accounting PLD)
    ledger     the dataset's privacy database (one per dataset, owner-only; SQLite or PostgreSQL): releases
               composed per record, budgets; training_runs: every DP training run on the dataset;
               locations: which database is the dataset's; ledger_schema: its tables and upgrade
    release    the one release function: check the budget, draw, edit (injected), record (refusals charged)
    randomness where DP-SGD's seeds come from: the OS CSPRNG, or the not-private reproducible mode
    bounds     the prior-aware bound on attribute inference from a randomized-response release
    session    EditSession: previews, feedback (more_private | less_private | accept | reject), release
    revision_manifest  dataset revisions: the accepted edits and their manifest (numpy and PIL only)

The serving path imports these while running only numpy and ONNX Runtime, so nothing here may
import torch (a test imports each module in a fresh interpreter and checks); the edit itself is
injected (see ``session.EditFn``, ``release.release``). Import the submodules directly:

    from veil.privacy.session import EditSession
"""
