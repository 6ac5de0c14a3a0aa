"""Running the engine beyond one GPU: one stream over several ranks (``sequence``: Ulysses sequence
parallelism on torch.distributed) and engine workers as Ray actors (``ray_pool``, extra
``streamgen[ray]``). Nothing else in streamgen imports this package."""
