"""Model importers into the IR: PyTorch (`pytorch.trace`); ONNX comes next."""
