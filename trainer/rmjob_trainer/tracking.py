"""Weights & Biases tracking (rank 0 only).

One :class:`Tracker` class serves both cases: with ``--with_tracking`` it wraps a W&B run,
without it it wraps nothing and every method returns at once, so the training loop calls it
unconditionally. As in open-instruct, the run is named after the run name, tagged with the
experiment name and carries the whole RewardConfig as its config; after a Hub push,
:meth:`Tracker.link_hub` records the model's URL on the run (config ``hf_repo_url``, summary
and notes), which is how the run and the trained model point at each other.

The API key is never handled here: wandb reads ``WANDB_API_KEY`` (or its own login file)
itself. ``WANDB_MODE=offline`` and ``WANDB_DIR`` work as usual.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from rmjob_trainer.config import RewardConfig

HUB_URL_KEY = "hf_repo_url"


class Tracker:
    """Logs to a W&B run, or does nothing when constructed without one.

    Tables and images are held back and logged with the next :meth:`log` call, so they share
    its step whichever order the caller uses: a step-less ``wandb.log`` would instead commit a
    row at W&B's own step counter, one step early, or ahead of the next ``log(step=...)``,
    which W&B then drops as non-monotonic.
    """

    def __init__(self, run: Any = None):
        self._run = run
        self._pending: dict[str, Any] = {}

    @property
    def url(self) -> str | None:
        """The run's page; None when tracking is off or the run is offline."""
        return self._run.url if self._run is not None else None

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log scalars (``train/rm/loss``, ``episode``, ...) at ``step``, with any pending media."""
        if self._run is not None:
            self._run.log({**self._pending, **metrics}, step=step)
            self._pending.clear()

    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Log a table (e.g. preference samples with their rewards) with the next step."""
        if self._run is not None:
            import wandb

            self._pending[key] = wandb.Table(columns=list(columns), rows=[list(r) for r in rows])

    def log_image(self, key: str, png_path: str) -> None:
        """Log an image file (e.g. the token-length histogram) with the next step."""
        if self._run is not None:
            import wandb

            self._pending[key] = wandb.Image(png_path)

    def link_hub(self, url: str) -> None:
        """Point the run at the pushed model: config, summary and notes all carry the URL."""
        if self._run is not None:
            self._run.config.update({HUB_URL_KEY: url}, allow_val_change=True)
            self._run.summary[HUB_URL_KEY] = url
            notes = self._run.notes or ""
            if url not in notes:
                self._run.notes = f"{notes}\n{url}".strip()

    def finish(self, exit_code: int = 0) -> None:
        """Close the run (W&B marks one with a nonzero ``exit_code`` failed); media logged after
        the last step join that step."""
        if self._run is not None:
            if self._pending:
                self._run.log(self._pending)
                self._pending.clear()
            self._run.finish(exit_code=exit_code)


def start_run(cfg: RewardConfig, run_name: str) -> Tracker:
    """Open the W&B run for this training run, or return a no-op tracker without --with_tracking."""
    if not cfg.with_tracking:
        return Tracker()
    import wandb

    run = wandb.init(
        project=cfg.wandb_project_name,
        entity=cfg.wandb_entity,
        name=run_name,
        config=dataclasses.asdict(cfg),
        tags=[cfg.exp_name],
    )
    return Tracker(run)
