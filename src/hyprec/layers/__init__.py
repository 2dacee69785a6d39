"""Building blocks shared by model families: the attention seam, norms, activations."""
