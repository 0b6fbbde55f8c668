"""``python -m rmjob_trainer ...`` (also what ``torchrun -m rmjob_trainer`` runs in the pods)."""

from rmjob_trainer.cli import run

run()
