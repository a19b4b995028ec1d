"""The training methods, one module each, each a frozen config (choices are str-Enums checked in `__post_init__`)
and a `plan(...)` that builds the `Plan` `mpt_edge.training_loop.fit` runs:

- `prompt_tuning`: vanilla PT, one prompt per task (MPT stage 1 `teachers`; baselines `pt` and, from a source
  task's prompt, `spot`).
- `source`: MPT stage 2, one shared P* and rank-r factors per source task, distilled from the teachers.
- `target`: MPT stage 3 from a source, modes `full`, `factors`, `group`.
- `head_only`: the no-prompt baseline of families that classify with heads.

`TrainConfig` (the loop: steps, batch, evaluation, checkpoints, optimizer rates) is shared by all of them.
"""
