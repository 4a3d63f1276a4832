"""robo_rlft: online RL fine-tuning of generative robot policies."""
