"""miles-ray library: config, data, models, rollout, training, algorithms, rewards, weights.

Pure Python/torch; nothing here imports Ray.
"""
__version__ = "0.1.0"
