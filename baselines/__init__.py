"""Baselines: DPDM, the non-private DDPM reference, and later DP-GAN, PATE-GAN, ... (installed as bench.baselines)."""
