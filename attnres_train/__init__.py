"""attnres-train: pretraining for hybrid linear/full-attention decoders with Attention Residuals."""

__version__ = "0.1.0"
