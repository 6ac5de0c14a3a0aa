"""Training of the small built-in models (synthetic data, autoencoders, DiT loops).

``streamgen-toy`` (the default built-in model; ``scripts/train_toy.py`` ->
``streamgen/weights/toy.safetensors``, loaded by ``streamgen.weights.load_toy``):

``toy_data``: procedural captioned clips (8 colours, 4 shapes, 8 motions, 5 backgrounds, 1-2
objects, mid-clip prompt switches, a held-out combination set) with ground truth, and the
measurements that read a video back into those attributes (used by ``bench/toy_eval.py``).
``toy``: the toy's text encoder, autoencoder (TAEHV-layout decoder) and the block-causal
teacher-forcing / self-generated-context training of the engine's ``WanModel``.

The older ``shapes`` model (``scripts/train_builtin.py`` -> ``shapes.safetensors``):
``shapes``: procedural videos of a coloured shape moving on a plain background, with captions.
``vae``: trains a Wan VAE as an autoencoder on them and measures its latent statistics.
``dit``: trains a block-causal Wan DiT with flow matching on the VAE latents, and scores samples.
"""
