"""Running the engine beyond one GPU: one stream over several ranks (``sequence``: Ulysses sequence
parallelism or ring attention on torch.distributed; ``pipeline``: the blocks split into stages;
``launch``: ``streamgen generate --parallel`` under torchrun) and engine workers as Ray actors
(``ray_pool``, and ``ray_sources``: the server's frame sources on them; extra ``streamgen[ray]``).
Only ``streamgen serve --ray`` and ``generate --parallel`` import this package, and Ray only the first."""
