"""tensorscope-basic: the reference plugin (loss, activation, gradient and weight statistics).

Written to be copied: each metric is one small module; ``plugin.py`` registers them.
"""

__version__ = "2.0.0"
