"""The drop-ins of ``gnorm.compat``: one private module per framework."""
