"""Pipeline parallel with ``torch.distributed.pipelining``: stage layout and schedules.

Stages: ``num_stages = pp * stages_per_rank`` contiguous runs of layers (the first stage also
holds the embeddings, the last the final norm and output projection). Stage -> rank:

    single-stage schedules (1F1B, GPipe)            rank r: stage r
    looped (Interleaved1F1B, LoopedBFS,
            InterleavedZeroBubble)                  rank r: stages r, r + pp, r + 2 pp, ...
    V schedules (ZBVZeroBubble, DualPipeV)          rank r: stages r and 2 pp - 1 - r, so the
                                                    last stage (the loss) is on rank 0
"""

from __future__ import annotations

V_SCHEDULES = ("ZBVZeroBubble", "DualPipeV")


def stage_ids_of_rank(pp_rank: int, *, pp: int, stages_per_rank: int, schedule: str) -> list[int]:
    """The pipeline stages held by ``pp_rank`` (see the module docstring).

    Raises:
        ValueError: a V schedule with ``stages_per_rank != 2``.
    """
    if schedule in V_SCHEDULES:
        if stages_per_rank != 2:
            raise ValueError(
                f"parallel.stages_per_rank ({stages_per_rank}) must be 2 with "
                f"parallel.pp_schedule={schedule}"
            )
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(stages_per_rank)]
