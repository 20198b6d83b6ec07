"""``python -m ddk_fast.config``: the config reference as Markdown (the README's table)."""

from .parse import reference_markdown

print(reference_markdown())
