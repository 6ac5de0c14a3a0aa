"""streamgen.media."""
