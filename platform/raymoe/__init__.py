"""raymoe: DeepSeek-style Mixture-of-Experts training and serving on Ray."""
