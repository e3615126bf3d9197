"""Quantization proper: fake-quant modules that compute what the ONNX file computes, their placement on the graph
(sim.py), activation ranges, bias correction, equalization, bit-width policy and block reconstruction."""
