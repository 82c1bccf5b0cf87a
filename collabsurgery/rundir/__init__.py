"""What a training run leaves on disk, read by export and written by train: checkpoints
(:mod:`.checkpoint`: atomic, verified, pruned), pickle-free optimizer/scheduler/RNG state
(:mod:`.training_state`), the run's records for people (:mod:`.metrics`: metrics.jsonl,
summary tables, history plots), and the lock that lets one trainer at a time write it
(:mod:`.lock`).

May import: errors, common. See docs/architecture.md.
"""
