"""streamgen: asynchronous streaming video generation.

Importable without a GPU; heavy submodules (torch models, media) are imported lazily
by the code that needs them.
"""

__version__ = "0.1.0"
