"""Your own training loop with ddk_fast's fused KD loss (offline: tiny Llama models built from configs)."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ddk_fast import fused_linear_kd_loss

torch.manual_seed(0)
cfg = dict(vocab_size=128, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)
teacher = LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=4, initializer_range=0.2, **cfg))
teacher.eval().requires_grad_(False)  # a real run loads both models with from_pretrained
student = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, **cfg))
opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
ids = torch.randint(0, 128, (16, 32))  # your data loader here
for step in range(20):
    with torch.no_grad():
        t_hidden = teacher.model(input_ids=ids, use_cache=False).last_hidden_state  # [B, T, H_t]: no logits
    s_hidden = student.model(input_ids=ids, use_cache=False).last_hidden_state
    out = fused_linear_kd_loss(
        s_hidden, student.lm_head.weight, t_hidden, teacher.lm_head.weight, labels=ids, shift_labels=True,
        divergence="forward_kl", temperature=2.0, kd_weight=1.0, ce_weight=0.0,
    )  # fmt: skip
    out.loss.backward()
    opt.step()
    opt.zero_grad()
    print(f"step {step:2d}  kd {out.kd.item():.4f}")
