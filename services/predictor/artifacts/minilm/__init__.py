"""The fast proxy predictor artifact: LoRA-tuned 4-layer MiniLM + head (data only)."""
