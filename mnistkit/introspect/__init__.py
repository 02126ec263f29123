"""What a model is, without training it: the layer-by-layer summary (shapes, parameters, mult-
adds), the receptive field by the course's formula, and the data-flow graph."""
