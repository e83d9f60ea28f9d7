"""Work that runs for a user: sessions, jobs in background threads, and the line for the device. No Gradio.

- `job`: `Job`, a piece of work in a daemon thread: its events handed on as they happen, a cancel flag that stops it
  within one step, its result (or its error, raised in the consuming thread) once it ends.
- `fair`: the device's line (`FairScheduler`: round-robin between users) and the limits a shared studio puts on one
  user (`QueueLimits`) and on one training run (`train_step_limit`).
- `session`: a user's `Session` (folder, cancel flags, thumbnails, latest training view, disk quota: `DiskLimits`),
  `Sessions` by id, and `SpentFiles` (used-up uploads).
- `generation`: `request_for` (a form's fields to a `GenerateRequest`) and `generation_updates` (one generation as a
  `Job`, streamed step by step).
- `training_run`: `TrainingRun` (a Trainer as a `Job`) and its `TrainingSnapshot`s, plain data for a live view.
- `training`: a session's training job: `training_snapshots`, and what the run learned kept in the session
  (`keep_concept`, `follow_to_end`).

Above the engine, the training loop and the library, which it uses; below the UI and the CLI. Nothing below imports
it.
"""
