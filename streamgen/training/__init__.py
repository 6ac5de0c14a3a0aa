"""Training of the small built-in models (synthetic data, VAE and DiT loops).

``shapes``: procedural videos of a coloured shape moving on a plain background, with captions.
``vae``: trains a Wan VAE as an autoencoder on them and measures its latent statistics.
``dit``: trains a block-causal Wan DiT with flow matching on the VAE latents, and scores samples.
Entry point: ``scripts/train_builtin.py``; the shipped result is ``streamgen/weights/shapes.safetensors``.
"""
