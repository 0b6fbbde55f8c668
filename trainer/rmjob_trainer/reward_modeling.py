"""open-instruct-style entry point: ``python trainer/rmjob_trainer/reward_modeling.py <flags>``.

Also works under ``accelerate launch``/``torchrun`` given this file's path, so open-instruct's
command lines run unchanged with only the script path swapped.
"""

import os
import sys

if __name__ == "__main__":
    # Run as a file, Python puts this package's own directory first on sys.path, where
    # config.py, data/, train.py ... would shadow top-level modules of the same names.
    # Import the package from its parent directory instead.
    _package_dir = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _package_dir]
    sys.path.insert(0, os.path.dirname(_package_dir))

    from rmjob_trainer.cli import run

    run()
