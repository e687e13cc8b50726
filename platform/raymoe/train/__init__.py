"""Training-side library: data pipeline and training loop."""
