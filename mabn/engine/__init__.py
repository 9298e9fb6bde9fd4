"""Training engine shared by the entry points: distributed setup, checkpoints, logging, sampling."""
