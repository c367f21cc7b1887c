"""Training: the runtime (device, precision, DDP), optimizers and schedule, resumable
checkpoints, the shared trainer loop, and the steps the language-model stages share."""
