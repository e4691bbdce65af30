"""freelm: the reference implementation of Free()LM (arXiv 2602.08030).

Importing the package is cheap and never imports torch: the in-process backend
and the trainer load torch/transformers/peft only when used.
"""

__version__ = "0.1.0"
