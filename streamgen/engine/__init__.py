"""streamgen.engine."""
