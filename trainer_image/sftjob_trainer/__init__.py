"""The SFTJob trainer: what runs in each training pod (and behind `sftjob run`).

    python -m sftjob_trainer --config PATH     the pod entrypoint (launcher.py)
    python -m sftjob_trainer.worker ...        one training process (worker.py -> train.main)

Modules: settings (config + rank env), config_map (-> SFTConfig), data, model,
train, progress (status reports), failures (reasons and exit codes), launcher,
local_run (`sftjob run`), tiny (a tiny local model and datasets for tests and demos).
Importing this package is cheap: torch, transformers and TRL load inside functions.
"""
