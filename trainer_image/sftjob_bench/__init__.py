"""Measurement tools for the trainer: the speed bench, its report and the GPU check.

They run on a development or GPU machine (`python -m sftjob_bench.bench`,
`python -m sftjob_bench.gpu_check`), never in a training pod: the trainer image copies
only `sftjob_trainer`, so none of this ships in it. They import the trainer; the trainer
never imports them.
"""
