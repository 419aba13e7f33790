"""Optional model backends, each needing an environment of its own (never imported by the core)."""
