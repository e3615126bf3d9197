"""From a calibrated simulation to a verified ONNX file: the integer model (int8 weights, int32 biases, uint8 Q/DQ),
torch.onnx export with exact graph clean-ups, INT4 packing, and the checks run before anything is written."""
