"""Shared core of Site Activity: settings, the event model, topic names, Postgres access and the CLI."""
