"""One-file checkpoints: the state_dict (masks included) and the config that rebuilds the model."""
from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from rm_sweep.atomic import atomic_write_bytes
from rm_sweep.errors import UserError
from rm_sweep.models.registry import Classifier, ModelConfig, build

FORMAT = "rm_sweep.checkpoint/1"


def checkpoint_bytes(model: Classifier, extra: dict[str, Any] | None = None) -> bytes:
    """The checkpoint file's content: ``{"format", "config", "state_dict", "extra"}``."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "config": model.config.to_dict(), "state_dict": model.state_dict(),
                "extra": extra or {}}, buf)
    return buf.getvalue()


def save_checkpoint(model: Classifier, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
    """Write ``model`` to ``path`` atomically (a reader never sees half a file)."""
    atomic_write_bytes(path, checkpoint_bytes(model, extra))


def _name(source: str | os.PathLike | IO[bytes]) -> str:
    """How an error names ``source``: its path (a ``Path``'s ``.name`` would be the file name alone)."""
    return str(source) if isinstance(source, (str, os.PathLike)) else str(getattr(source, "name", "a stream"))


def read_checkpoint(source: str | os.PathLike | IO[bytes]) -> dict[str, Any]:
    """The raw checkpoint dict, checked to be an rm_sweep checkpoint; loads tensors only.

    ``source``: a local path, a URI ``pyarrow.fs`` resolves (``s3://bucket/.../<model_id>.pt``,
    what a store's ``checkpoint`` column holds), or an open binary file.
    """
    name = _name(source)
    if isinstance(source, str):
        # Imported here: the value layer (spec) imports this package and must not load pyarrow.
        from rm_sweep import uris

        if uris.is_uri(source):
            source = io.BytesIO(uris.read_bytes(source, what="checkpoint"))
    if isinstance(source, (str, os.PathLike)) and not Path(source).is_file():
        raise UserError(f"checkpoint {name} does not exist")
    try:
        ckpt = torch.load(source, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError) as exc:
        raise UserError(f"checkpoint {name} is corrupt or not a torch file ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{name} is not an rm_sweep checkpoint (expected format {FORMAT})")
    return ckpt


def load_checkpoint(source: str | os.PathLike | IO[bytes]) -> Classifier:
    """Rebuild the model from the checkpoint's config alone and load its weights and masks.

    ``source``: as ``read_checkpoint`` takes it (a path, an ``s3://`` URI, an open file).
    """
    name = _name(source)
    ckpt = read_checkpoint(source)
    try:
        model = build(ModelConfig.from_dict(ckpt["config"]))
        state = ckpt["state_dict"]
    except UserError as exc:
        raise UserError(f"checkpoint {name}: {exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a field missing or of another type
        raise UserError(f"checkpoint {name} is damaged ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as exc:
        first = str(exc).splitlines()[0]
        raise UserError(f"checkpoint {name} does not match its config: {first}") from None
    return model


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (masks are buffers and do not count)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
