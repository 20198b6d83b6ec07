"""The distillation trainer: the loop (``trainer.py``) and the parts it composes, one job each: the teacher
(``teacher.py``: the one place that knows where the teacher signal comes from), the models (``bundle.py``),
DDK's schedule (``schedule.py``, ``curriculum.py``), checkpoints (``checkpoint.py``, ``checkpointer.py``),
the run folder (``runfolder.py``, ``runlock.py``), the non-finite policy, metrics and the report."""
