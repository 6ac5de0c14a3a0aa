"""streamgen.ops."""
