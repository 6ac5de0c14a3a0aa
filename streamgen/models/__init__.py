"""streamgen.models."""
