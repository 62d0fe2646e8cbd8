"""Running the model: load onto a memory plan, prompts, prefill/decode, latent cache, sampling."""
