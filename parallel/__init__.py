"""Parallelism applied to plain models: mesh, TP/SP, pipeline, expert and data parallel.

What to call: ``parallel.mesh.ParallelDims`` (the layout and its device mesh),
``parallel.parallelize.parallelize_model`` (TP/SP -> EP -> checkpointing -> compile -> FSDP2 on a
meta model, by the family's plan), ``parallel.pipeline.build_pipeline`` / ``pipeline_step``
(pipeline stages and schedules), ``parallel.deepspeed_engine`` (the optional DeepSpeed engine).
Guarantee: every layout computes what one process computes (tested on gloo against it); models
are reached only through their plan's submodule paths (``pretrain.models.parallel_plan``).
"""
