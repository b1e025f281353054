"""Running a recipe: the build, the event loop, the run folder, checkpoints, resume, torchrun."""
