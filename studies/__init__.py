"""Experiments that anyone can rerun on a CPU; each subpackage is one study with its own ``__main__``."""
