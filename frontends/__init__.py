"""Model importers into the IR (PyTorch: `pytorch.trace`; ONNX: `onnx_import.load_onnx`) and the
ONNX QDQ exporter (`onnx_export.export_onnx`)."""
