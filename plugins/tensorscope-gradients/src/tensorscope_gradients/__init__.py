"""tensorscope-gradients: gradient flow and pathology, task conflicts (PCGrad), sample-level
conflicts, TracIn and critical samples, on per-example gradients computed once per batch."""

__version__ = "2.0.0"
