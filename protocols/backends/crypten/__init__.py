"""The `crypten` backend: CrypTen 0.4.1's protocols, with twinfer's dealer and transport."""
