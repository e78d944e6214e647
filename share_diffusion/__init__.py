"""Share Studio: continual style learning for Stable Diffusion with shared LoRA subspaces."""
