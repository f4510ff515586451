"""The training recipe (recipe.py) and the small pieces it calls: builders, step, loss, optimizer,
batches, checkpoints and resume, outputs, validation and the plan print."""
