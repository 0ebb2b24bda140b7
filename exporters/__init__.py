"""PyTorch -> ONNX export, checked against PyTorch before anything else sees the graph."""
