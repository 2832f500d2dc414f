"""Distributed techniques applied around the single-device model (one module per technique)."""
