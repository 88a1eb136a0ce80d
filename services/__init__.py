"""muserve: power-aware model serving over NATS."""

__version__ = "0.1.0"
