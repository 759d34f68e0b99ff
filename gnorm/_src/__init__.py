"""gnorm's private implementation; import from ``gnorm`` instead."""
