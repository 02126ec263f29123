"""Using a trained run: predicting the user's images, exporting (ONNX, safetensors), explaining a
prediction."""
