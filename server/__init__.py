"""Cat-or-dog photo classifier: the torch-free serving package."""

__version__ = "0.1.0"
