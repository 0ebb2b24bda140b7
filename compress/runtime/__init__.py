"""ONNX Runtime, as the stages use it: sessions, input feeds, int8 presets per CPU, kernel counts, timing."""
