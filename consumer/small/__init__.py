"""The small model: ONNX Runtime + HF tokenizers scoring (the only package that runs them), hot reload of a
new model folder, and the calibration arithmetic (softmax, temperature, reliability bins, ECE) used everywhere."""
