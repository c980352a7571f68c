"""Moves experts between a MoME state dict and single-expert state dicts (the fourth run's stages 1 and 2).

python assemble.py extract WORK START MODALITY...   # START's experts -> WORK/init/<modality>.pt
python assemble.py replace WORK START MODALITY...   # START + WORK/experts/<modality>/model.pt -> WORK/assembled.pt
    [--experts NAME] [--out FILE]                   # WORK/NAME/<modality>/model.pt instead; another output file
"""

import argparse
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


def replace(work: Path, start: Path, modalities: list[str], experts: str = "experts", out: Path | None = None) -> None:
    state = torch.load(start, map_location="cpu", weights_only=True)
    for modality in modalities:
        prefix = _prefix(modality)
        expert = torch.load(work / experts / modality / "model.pt", map_location="cpu", weights_only=True)
        if sorted(k[len(prefix) :] for k in state if k.startswith(prefix)) != sorted(expert):
            raise KeyError(f"{modality}: the expert's keys differ from {start}'s")
        state.update({prefix + k: v for k, v in expert.items()})
        print(f"replaced {prefix}* ({modality}): {len(expert)} tensors")
    torch.save(state, out or work / "assembled.pt")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("extract", "replace"))
    parser.add_argument("work", type=Path)
    parser.add_argument("start", type=Path)
    parser.add_argument("modalities", nargs="+", choices=MODALITIES)
    parser.add_argument("--experts", default="experts", help="replace: folder of the experts under WORK")
    parser.add_argument("--out", type=Path, help="replace: output file (default WORK/assembled.pt)")
    args = parser.parse_args()
    if args.command == "extract":
        extract(args.work, args.start, args.modalities)
    else:
        replace(args.work, args.start, args.modalities, args.experts, args.out)
