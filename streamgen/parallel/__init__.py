"""Running the engine beyond one GPU: one stream over several ranks (``sequence``: Ulysses sequence
parallelism on torch.distributed) and engine workers as Ray actors (``ray_pool``, and ``ray_sources``:
the server's frame sources on them; extra ``streamgen[ray]``). Only ``streamgen serve --ray`` imports
this package (streamgen/server/serve.py), and Ray only then."""
