"""Judging a trained policy: policy vs reference on held-out prompts (compare), the promotion gates,
their statistics plots, and the held-out monitor PPO runs during training (evaluate)."""
