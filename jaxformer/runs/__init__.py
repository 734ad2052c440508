"""Run directories: the saved config and tokenizer, orbax checkpoints, and opening a run.

``rundir`` names the files of a run dir and guards against conflicting reuse, ``checkpoint``
saves and restores train states (or weights alone), ``restore`` opens a run dir and returns its
config and the weights of a checkpoint. Training, inference, export and analysis all go through
here, so a run is read the same way everywhere.
"""
