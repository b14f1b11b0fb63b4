"""tensorscope-information: mutual information, partial information decomposition and MDL for TensorScope."""

__version__ = "2.0.0"
