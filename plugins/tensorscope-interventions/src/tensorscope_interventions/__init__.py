"""tensorscope-interventions: intervention vectors, steering vectors and null-space projections."""

__version__ = "2.0.0"
