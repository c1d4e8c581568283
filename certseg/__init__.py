"""certseg: certifiably robust semantic segmentation, from training to serving."""

__version__ = "0.1.0"
