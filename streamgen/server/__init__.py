"""streamgen.server."""
