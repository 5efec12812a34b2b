"""bench: a benchmark harness for differentially private generative models of images."""

__version__ = "0.1.0"
