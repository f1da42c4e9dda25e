"""Launchers: torchrun and SLURM, and the demo job."""
