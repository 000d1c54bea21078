"""Placeholder: replaced by the transformers quantizer registration."""
