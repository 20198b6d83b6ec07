"""Drop-in use of the fused KD loss from other trainers.

- :mod:`ddk_fast.integrations.transformers`: ``distill_loss``, ``KDArgs``, ``DistillationTrainer`` (a
  ``transformers.Trainer``); transformers is a dependency of ddk_fast.
- :mod:`ddk_fast.integrations.trl`: ``FusedGKDTrainer`` (TRL's ``GKDTrainer`` with the fused loss); needs the
  optional extra ``pip install 'ddk_fast[trl]'``.

Nothing is imported here: each submodule imports its library when it is imported.
"""
