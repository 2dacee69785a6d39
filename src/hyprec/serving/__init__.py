"""The OpenAI-compatible HTTP server (``hyprec serve``): request schema, engine loop, metrics and the app."""
