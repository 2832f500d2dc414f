"""Evaluating trained models: held-out loss / bits per byte (attnres-eval) and an lm-evaluation-harness model."""
