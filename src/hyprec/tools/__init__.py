"""The tools that measure and repair a model through the engine's public API: ``check`` (precision risk), ``compare``
(fidelity against float32 references) and ``repair`` (per-layer precision plans)."""
