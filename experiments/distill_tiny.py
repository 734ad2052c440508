"""Knowledge distillation (Hinton et al. 2015): a GPT with half of gpt_tiny's layers (2 x
d_model 192) learns the standard library's source from the labels and from gpt_tiny's
predictions at temperature 2.

    jaxformer train experiments/gpt_tiny.py            # first: the teacher, in runs/gpt_tiny
    jaxformer train experiments/distill_tiny.py
    jaxformer train experiments/distill_tiny.py --set train.teacher= \\
        --run-dir runs/distill_tiny_alone              # the same student without a teacher

The student has the teacher's data, tokenizer (trained from the same files, so the same ids),
steps, batch and seed; the validation loss is the student's plain cross-entropy either way,
so the two runs compare directly (results in docs/usage.md, "Knowledge distillation").
"""

import dataclasses
from pathlib import Path

from jaxformer.config import Config, load_experiment


def config() -> Config:
    teacher = load_experiment(Path(__file__).parent / "gpt_tiny.py")
    return dataclasses.replace(
        teacher,
        name="distill_tiny",
        model=dataclasses.replace(teacher.model, n_layers=2),
        train=dataclasses.replace(teacher.train, teacher="runs/gpt_tiny", distill_alpha=0.5,
                                  distill_temperature=2.0),
    )
