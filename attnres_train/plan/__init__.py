"""The run planner (``attnres-plan``): per-GPU memory, step time and tokens/s of every parallel layout of a model
on a cluster, before the job is queued. ``model_facts`` reads the model's exact sizes and FLOPs from a
meta-device build, ``memory`` and ``step_time`` hold the two models, ``layouts`` enumerates and ranks."""
