"""``python -m rmjob_trainer ...`` (also what ``torchrun -m rmjob_trainer`` runs in the pods)."""

import sys

from rmjob_trainer.cli import main

sys.exit(main())
