"""Data: indexed datasets, blends and the dynamic mixture schedule."""
