"""Command line, Ray bring-up and the training loop."""
