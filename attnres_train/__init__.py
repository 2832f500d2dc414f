"""attnres-train: pretraining for hybrid linear/full-attention decoders with Attention Residuals."""

__version__ = "0.1.0"

# Cheap: makes transformers' Auto classes know exported attnres models once transformers itself is imported.
from attnres_train.interop.registration import register_with_transformers as _register_with_transformers

_register_with_transformers()
