"""veil.export: the edit sampler on ONNX Runtime.

``exporter`` (torch) writes a verified export folder (``veil export``); ``graphs`` builds its ONNX
graphs; ``runtime.OrtEditor`` (numpy and onnxruntime only, no torch) runs edits from it.
"""
