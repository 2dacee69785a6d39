"""The OpenAI-compatible HTTP server (``hyprec serve``): request schema, engine loop, metrics, the serving classes,
their routes and the app."""
