"""What every optimizer method shares: the ONNX-to-module rebuild, forward hooks, the training loop, the validation split, accuracy and the artifact writer."""
