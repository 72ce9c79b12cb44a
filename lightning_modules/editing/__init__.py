"""Private attribute edits, the torch side: the torch backend of the edit pipeline (``veil.editing``).

    editor  TorchBackend (the DDIM walks, the classifiers) and PrivateEditor (the pipeline on it,
            from_checkpoint); load_checkpoint_editor is what ``veil.editing.load.load_editor`` uses
"""
