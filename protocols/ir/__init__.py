"""The graph IR: public model structure, its JSON form and checks, ONNX in and out."""
