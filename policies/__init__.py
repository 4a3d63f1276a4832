"""Policy models: flow policies, noise schemes, critics, checkpoints."""
