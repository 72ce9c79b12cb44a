"""Private attribute edits, the torch side: the editor that ``veil edit`` (``veil.jobs.edit``) runs.

    editor  PrivateEditor: invert, privatize, regenerate (the sessions' EditFn)
"""
