"""`site-activity dev`: placeholder until the dev stack lands (being written now)."""
