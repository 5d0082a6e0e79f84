"""The browser script (static/hydra.js), the pre-load snippet and the demo site."""
