"""Writes <work>/assembled.pt: demo MoME 0.7.0 (models/model.pt) with the fine-tuned experts of experts64.sh."""

import sys
from pathlib import Path

import torch

MODALITIES = ("t1", "t1ce", "t2", "flair", "dwi")


def main(work: Path, start: Path, tuned: list[str]) -> None:
    state = torch.load(start, map_location="cpu", weights_only=True)
    for modality in tuned:
        index = MODALITIES.index(modality)
        expert = torch.load(work / "experts" / modality / "model.pt", map_location="cpu", weights_only=True)
        prefix = f"experts.{index}."
        keys = [k for k in state if k.startswith(prefix)]
        if sorted(k[len(prefix) :] for k in keys) != sorted(expert):
            raise KeyError(f"{modality}: the expert's keys differ from {start}'s")
        state.update({prefix + k: v for k, v in expert.items()})
        print(f"replaced expert {index} ({modality}): {len(expert)} tensors")
    torch.save(state, work / "assembled.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
