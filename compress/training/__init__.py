"""What the stages that train share: the loop (checkpoints, resume, early stopping, DDP), batching and
tokenised feeds, the distillation losses, and the students (task training, HF and zoo distillation)."""
