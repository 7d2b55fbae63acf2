"""The library version (a leaf: the checkpoint writer records it without importing the package face)."""
__version__ = "0.1.0"
