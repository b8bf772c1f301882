"""Training checkpoints without pickles: tensors in safetensors, the rest in JSON."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


def save_checkpoint(folder: str | Path, model: nn.Module, opt: torch.optim.Optimizer, state: dict,
                    best: dict[str, torch.Tensor]) -> None:
    """Latest training state (model, optimizer, epoch, metrics) and the best weights so far."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(_cpu(model.state_dict()), str(folder / "model.safetensors"))
    save_file(_cpu(best), str(folder / "best.safetensors"))
    osd = opt.state_dict()
    tensors = {f"{pid}.{key}": v for pid, st in osd["state"].items() for key, v in st.items()
               if torch.is_tensor(v)}
    save_file(_cpu(tensors), str(folder / "optimizer.safetensors"))
    (folder / "state.json").write_text(json.dumps({**state, "param_groups": osd["param_groups"]}))


def load_checkpoint(folder: str | Path, model: nn.Module,
                    opt: torch.optim.Optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore model and optimizer in place; returns (state, best weights)."""
    folder = Path(folder)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    state = json.loads((folder / "state.json").read_text())
    per: dict[int, dict] = {}
    for name, v in load_file(str(folder / "optimizer.safetensors")).items():
        pid, key = name.split(".", 1)
        per.setdefault(int(pid), {})[key] = v
    opt.load_state_dict({"state": per, "param_groups": state.pop("param_groups")})
    return state, load_file(str(folder / "best.safetensors"))


def load_best(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(best weights, state) of a checkpoint, for the bundle."""
    folder = Path(folder)
    state = json.loads((folder / "state.json").read_text())
    state.pop("param_groups", None)
    return load_file(str(folder / "best.safetensors")), state


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
