"""Models and their training: loading, the generation engines (HF, vLLM), the reward model, PPO and
its losses (train_reward_model, reinforce). Never imports evaluation/ or serving/."""
