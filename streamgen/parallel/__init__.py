"""Running the engine beyond one GPU: one stream over several ranks (``sequence``: Ulysses
sequence parallelism on torch.distributed). Nothing here is imported by the rest of streamgen."""
