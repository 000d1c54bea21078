"""Pure quantization math: MinMax quantizer, slicing, straight-through estimators."""
