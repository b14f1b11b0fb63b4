"""tensorscope-dynamics: training-dynamics metrics for TensorScope (phase transitions, grokking,
plasticity, signal propagation, fragility, representation drift)."""

__version__ = "2.0.0"
