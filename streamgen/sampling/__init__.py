"""streamgen.sampling."""
