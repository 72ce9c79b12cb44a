"""The edit pipeline: what both editors (torch and ONNX Runtime) share, without torch.

    plan      the DDIM edit grid and the check's re-do ladder
    backend   EditBackend: what the pipeline needs of a runtime (invert, add_noise, regenerate, logits)
    pipeline  EditPipeline: masking before inversion, the edit, the check and its re-dos, refusal, guesses
    load      load_editor: a checkpoint on torch or an export on ONNX Runtime (imports torch lazily; the
              only module here above the torch library in the import layers)
"""
