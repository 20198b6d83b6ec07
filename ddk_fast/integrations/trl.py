"""TRL's ``GKDTrainer`` with the fused generalised JSD: ``FusedGKDTrainer``.

Needs the optional extra: ``pip install 'ddk_fast[trl]'``. Same constructor, config and on-policy sampling
as TRL's ``GKDTrainer`` (``lmbda``, ``seq_kd``, ``temperature`` for sampling); only ``compute_loss`` changes:
TRL materialises both models' ``[B, T, V]`` logits and calls ``generalized_jsd_loss``, this computes the same
quantity from the final hidden states with :func:`ddk_fast.integrations.transformers.distill_loss`.

TRL's conventions, kept: M = beta p + (1 - beta) q with p the teacher and q the student, D = beta KL(p||M) +
(1 - beta) KL(q||M) (beta 0 = forward KL, 1 = reverse KL); the loss's temperature is 1 (``GKDConfig``'s
``temperature`` is the sampling temperature only); no T^2 factor and no CE term; tokens with shifted
``labels == -100`` are ignored; the sum is divided by ``num_items_in_batch`` when the trainer passes it, by
the number of counted tokens otherwise.
"""

from __future__ import annotations

from .transformers import distill_loss

try:  # TRL >= 1.0 keeps GKD under trl.experimental; earlier releases export it at the top level
    from trl.experimental.gkd import GKDTrainer
except ImportError:  # pragma: no cover - depends on the installed TRL
    try:
        from trl import GKDTrainer
    except ImportError as exc:
        raise ImportError(
            "ddk_fast.integrations.trl needs TRL's GKDTrainer: install the optional extra with "
            "`pip install 'ddk_fast[trl]'`"
        ) from exc

__all__ = ["FusedGKDTrainer"]


class FusedGKDTrainer(GKDTrainer):
    """``trl``'s ``GKDTrainer`` whose loss is ddk_fast's fused generalised JSD (no ``[N, V]`` logits).

    Arguments as ``GKDTrainer``. The loss equals ``GKDTrainer.compute_loss``'s (tested within 1e-5). Extra
    keyword ``loss_backend`` (``auto`` | ``torch`` | ``triton``) picks the fused loss's backend.
    """

    def __init__(self, *args, loss_backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_backend = loss_backend

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.teacher_model.eval()
        batch = {"input_ids": inputs["input_ids"], "attention_mask": inputs.get("attention_mask"),
                 "labels": inputs["labels"]}  # fmt: skip
        out = distill_loss(
            model, self.teacher_model, batch, divergence="jsd", beta=self.beta, temperature=1.0,
            kd_weight=1.0, ce_weight=0.0, scale_by_t2=False, num_items_in_batch=num_items_in_batch,
            backend=self.loss_backend,
        )  # fmt: skip
        return (out.loss, {"loss": out.loss}) if return_outputs else out.loss
