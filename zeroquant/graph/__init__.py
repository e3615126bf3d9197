"""The model as a torch.export aten graph: capture, what each op means to the quantizer (ops.py), BatchNorm
statistics and folding. Everything later works on this graph, never on module class names."""
