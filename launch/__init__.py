"""Launchers: torchrun and SLURM, and the demo job.

What to call: ``launch/torchrun.sh N configs/X.yaml [section.key=value ...]`` (one node, N
processes of ``pretrain.train``); ``python -m launch.slurm`` (multi-node: writes, and with
``--submit`` submits, an sbatch script); ``python -m launch.preprocess`` (tokenizer training and
sharding as Slurm array jobs, or ``--local``); ``python -m launch.demo`` (``make demo``).
``launch.env`` is the only module of the project that reads the launcher's environment
variables; ``launch.sbatch`` holds the sbatch helpers the launchers share.
"""
