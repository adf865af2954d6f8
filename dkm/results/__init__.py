"""Results stores: runs, failures, checkpoints, sweeps, and fitted models read back.

:class:`ResultsStore` is the only code that reads or writes a results store; ``dkm show``,
``dkm report`` and :func:`load_model` go through it.
"""

from dkm.results.models import load_model
from dkm.results.store import ResultsStore, RunInfo, run_name
from dkm.results.sweep import elbow, sweep_table

__all__ = ["ResultsStore", "RunInfo", "elbow", "load_model", "run_name", "sweep_table"]
