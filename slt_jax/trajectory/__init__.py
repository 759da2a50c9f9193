"""Training trajectories: Orbax checkpoints in, per-checkpoint results (resumable) and curves out."""
