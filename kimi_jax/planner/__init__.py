"""The memory planner behind `python -m kimi_jax.plan` (kimi_jax/plan.py): targets.py names the
machines, memory.py gives exact weight and cache bytes per mesh, compiled.py and activations.py the
programs' temporaries, search.py picks the mesh, table.py keeps the docs' hardware table."""
