"""faust stream processors: sessions, identity linkage, enriched events (see state.py for the rules)."""
