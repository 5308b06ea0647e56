"""A Hydra sweeper on current Optuna (3 and 4, SQLAlchemy 2): ``hydra/sweeper=optuna``.

Same configuration as hydra-optuna-sweeper 1.3 (direction, n_trials, n_jobs, storage, study_name,
sampler, and ``params`` in Hydra's sweep syntax: ``choice(…)``, ``range(…)``, ``interval(…)``,
``tag(log, interval(…))``), which pins optuna < 3 and so SQLAlchemy < 2 (MLflow's server needs 2).
Each trial also records the run folder it produced and how the run ended (``user_attrs``).

``hydra_plugins`` is a namespace package shared by every Hydra plugin: Hydra discovers this one by
scanning it, and skips modules whose names start with ``_`` (``_impl`` imports Optuna).
"""
