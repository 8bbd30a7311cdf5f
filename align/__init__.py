"""align: SFT, reward modelling and RL (PPO, GRPO, TRPO, REINFORCE) for small causal language models."""

__version__ = "0.1.0"
