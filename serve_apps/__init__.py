"""Ray Serve applications for `serve deploy serve_apps/config.yaml` (import path serve_apps.app:app)."""
