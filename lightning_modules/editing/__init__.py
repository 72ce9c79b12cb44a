"""Private attribute edits: the editor and the batch job of ``veil edit``.

    editor  PrivateEditor: invert, privatize, regenerate (the sessions' EditFn)
    job     run_edit (releases through the ledger, a dataset revision) and run_sweep (previews only)
"""
