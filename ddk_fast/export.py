"""``python -m ddk_fast.export --run runs/x --out DIR [--merge] [--dtype float32|bfloat16] [--no-check]``: a
run's final student as a folder that loads anywhere.

* ``--merge``: one full Hugging Face model (safetensors + config + tokenizer) that
  ``AutoModelForCausalLM.from_pretrained(DIR)`` loads with neither peft nor ddk_fast. LoRA adapters are merged
  into the base; for a QLoRA student the NF4 base is first dequantised to the compute dtype (the weights the
  adapters were trained against, not the original full-precision ones), so the merged model computes what
  the trained student computed. A full-mode student is copied as it is.
* without ``--merge``: the adapters (``final/`` as it is: ``adapter_config.json`` names the base by Hub id or
  absolute path), for ``PeftModel.from_pretrained``.

The check (skip with ``--no-check``) reloads the written folder and compares its logits on a probe sequence
with the trained student's (base + adapters as trained); the largest difference is printed.
Exit 2 with one line on stderr when the run has no usable ``final/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(prog="python -m ddk_fast.export", description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="the run folder (its final/ is exported)")
    parser.add_argument("--out", required=True, help="the folder to write")
    parser.add_argument("--merge", action="store_true", help="one full model, adapters merged in")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: the run's compute dtype")
    parser.add_argument("--no-check", action="store_true", help="skip the reload-and-compare check")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    from .errors import ConfigError

    try:
        out = export(
            Path(args.run), Path(args.out), merge=args.merge, dtype=args.dtype, check=not args.no_check
        )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"exported: {out}")
    return 0


def export(run: Path, out: Path, *, merge: bool, dtype: str | None = None, check: bool = True) -> Path:
    import torch

    from .config import looks_like_hub_id
    from .errors import ConfigError
    from .models.loading import FINAL_INFO, final_info

    final = run / "final"
    info = final_info(final)
    if not info:
        raise ConfigError("--run", str(run), f"a run folder whose final/ holds {FINAL_INFO} (a finished run)")
    if out.resolve() == final.resolve():
        raise ConfigError("--out", str(out), "a folder other than the run's final/")
    mode, base = info["student_mode"], info.get("base_model")
    if base and not looks_like_hub_id(base):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local base: never wait on a hub lookup
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if mode == "full" or not merge:  # a full model, or the portable adapters: final/ as it is
        shutil.copytree(final, tmp)
    else:
        compute = getattr(torch, dtype or info.get("dtype") or "float32")
        merged = _merged(final, info, compute)
        merged.save_pretrained(tmp, safe_serialization=True)
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(final)).save_pretrained(tmp)
        (tmp / FINAL_INFO).write_text(
            json.dumps({**info, "merged": True, "dtype": str(compute).replace("torch.", "")}, indent=1) + "\n"
        )
        if check:
            diff = _check(final, info, tmp, compute)
            print(f"check: largest |logit difference| of the merged model vs the trained student: {diff:.3g}")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _base(info: dict, dtype, dequantize: bool):
    import torch

    from .models.loading import load_model, load_nf4, resolve_source

    if info["student_mode"] == "qlora":
        model = load_nf4(resolve_source(info["base_model"], "base_model", info.get("revision") or ""), dtype,
                         torch.device("cpu"))  # fmt: skip
        return model.dequantize() if dequantize else model
    rev = info.get("revision") or ""
    return load_model(info["base_model"], "base_model", dtype, torch.device("cpu"), revision=rev)


def _merged(final: Path, info: dict, dtype):
    """The base (a QLoRA base dequantised to ``dtype``) with the adapters merged in: plain linear layers."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(_base(info, dtype, dequantize=True), str(final))
    merged = model.merge_and_unload()
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(merged.config, attr):
            delattr(merged.config, attr)
    return merged


def _check(final: Path, info: dict, folder: Path, dtype) -> float:
    """Largest |logit difference| between the written model and the trained student (base + adapters)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trained = PeftModel.from_pretrained(_base(info, dtype, dequantize=False), str(final)).eval()
    written = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).eval()
    vocab = written.get_output_embeddings().weight.shape[0]
    ids = (torch.arange(32) * 7919 % vocab)[None]
    with torch.no_grad():
        return float(
            (trained(input_ids=ids).logits.float() - written(input_ids=ids).logits.float()).abs().max()
        )


if __name__ == "__main__":
    sys.exit(main())
