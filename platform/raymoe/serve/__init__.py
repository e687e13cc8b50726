"""Serving: expert groups as Ray Serve deployments, and where each routed expert lives."""
