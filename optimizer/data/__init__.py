"""Training data: Fashion-MNIST and MNIST images, categorical click data for DP training."""
