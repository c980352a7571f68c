"""Moves experts between a MoME state dict and single-expert state dicts (the fourth run's stages 1 and 2).

python assemble.py extract WORK START MODALITY...   # START's experts -> WORK/init/<modality>.pt
python assemble.py replace WORK START MODALITY...   # START + WORK/experts/<modality>/model.pt -> WORK/assembled.pt
"""

import sys
from pathlib import Path

import torch

MODALITIES = ("t1", "t1ce", "t2", "flair", "dwi")


def _prefix(modality: str) -> str:
    return f"experts.{MODALITIES.index(modality)}."


def extract(work: Path, start: Path, modalities: list[str]) -> None:
    state = torch.load(start, map_location="cpu", weights_only=True)
    (work / "init").mkdir(parents=True, exist_ok=True)
    for modality in modalities:
        prefix = _prefix(modality)
        expert = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        torch.save(expert, work / "init" / f"{modality}.pt")
        print(f"extracted {prefix}* ({modality}): {len(expert)} tensors")


def replace(work: Path, start: Path, modalities: list[str]) -> None:
    state = torch.load(start, map_location="cpu", weights_only=True)
    for modality in modalities:
        prefix = _prefix(modality)
        expert = torch.load(work / "experts" / modality / "model.pt", map_location="cpu", weights_only=True)
        if sorted(k[len(prefix) :] for k in state if k.startswith(prefix)) != sorted(expert):
            raise KeyError(f"{modality}: the expert's keys differ from {start}'s")
        state.update({prefix + k: v for k, v in expert.items()})
        print(f"replaced {prefix}* ({modality}): {len(expert)} tensors")
    torch.save(state, work / "assembled.pt")


if __name__ == "__main__":
    {"extract": extract, "replace": replace}[sys.argv[1]](Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:])
