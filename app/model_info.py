"""How the app names and describes the loaded model (the chat header, /v1/models)."""

from __future__ import annotations

import re
from pathlib import Path

_SNAPSHOT = re.compile(r"models--(.+?)/snapshots/[0-9a-f]{40}$")


def model_name(path: Path) -> str:
    """The repo id for a Hugging Face cache snapshot, else the checkpoint folder's name."""
    match = _SNAPSHOT.search(Path(path).as_posix())
    return match[1].replace("--", "/") if match else Path(path).name


def model_summary(model) -> str:
    t = model.config.text
    dtype = str(model.dtype).removeprefix("torch.")
    return (f"**{model_name(model.path)}** · {model.device} · {dtype} · "
            f"{model.engine.max_context:,} tokens of context · {t.n_routed_experts} experts "
            f"(top-{t.num_experts_per_tok})")
