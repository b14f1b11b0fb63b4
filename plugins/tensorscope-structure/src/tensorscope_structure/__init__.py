"""tensorscope-structure: modularity of MLP unit graphs and head composition graphs, task separability per layer."""

__version__ = "2.0.0"
