"""Trained predictor artifacts shipped with muserve (weights that differ from the packaged encoder)."""
