"""The shipped proxy predictor artifact: SmolLM2 16-layer encoder (frozen) + head (data only)."""
