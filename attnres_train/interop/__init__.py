"""Hugging Face interop: export to / import from transformers directories (native Kimi Linear or this package's
own ``attnres`` model type). Importing this package imports nothing heavy; see its modules."""
