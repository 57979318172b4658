"""recmix: industrial-scale ranking models on Ray."""

__version__ = "0.1.0"
