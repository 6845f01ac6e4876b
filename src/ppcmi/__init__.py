"""ppcmi: privacy-preserving collaborative medical image segmentation (PPCMI-SF)."""

__version__ = "0.1.0"
