"""Training, as plain classes: the Learner (an actor) and the group of learner ranks (driver side)."""
