"""Thin routers: parse the HTTP specifics, call a service, shape the response."""
