"""Training: the Accelerate loop (:mod:`.engine`), checks made before a run writes anything
(:mod:`.preflight`), evaluation of every head and the ensemble (:mod:`.evaluate`), and the
built-in demo (:mod:`.demo`).

May import every layer below it (errors, common, models, surgery, data, graphs, objectives,
config, rundir, export). See docs/architecture.md.
"""
