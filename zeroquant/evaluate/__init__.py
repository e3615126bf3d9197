"""Measuring ONNX files after export: accuracy on image folders, onnxruntime latency and kernel profiles, and the
per-layer SQNR report of `inspect`. Works on any ONNX classifier, zeroquant's or not."""
