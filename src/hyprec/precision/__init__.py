"""What the engine needs to run a model in mixed precision: the dtype policy, precision plans and how they are applied,
exact rescaling, attention-input bounds, emulated half arithmetic and the run-time guard."""
