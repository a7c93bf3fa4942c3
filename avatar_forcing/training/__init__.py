"""Training: data preparation, diffusion forcing, DPO and the trainer."""
