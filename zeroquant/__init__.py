"""zeroquant: data-free quantization of BatchNorm CNNs to integer ONNX models."""
