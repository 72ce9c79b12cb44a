"""The torch-free edit pipeline: what both editors (torch and ONNX Runtime) share.

    plan      the DDIM edit grid and the check's re-do ladder
"""
