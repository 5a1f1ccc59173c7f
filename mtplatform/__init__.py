"""mtplatform: multi-task text-to-text training in PyTorch on seqio."""

__version__ = "0.1.0"
