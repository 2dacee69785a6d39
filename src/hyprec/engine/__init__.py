"""The engine: batching, model execution, outputs."""
