"""Running a training: joining Ray, starting the actors, the driver loop, checkpoints, fault injection."""
