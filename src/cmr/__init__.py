"""cmr: a reproducible study pipeline for cross-modal retrieval."""
__version__ = "0.1.0"
