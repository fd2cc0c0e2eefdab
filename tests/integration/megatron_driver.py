"""Run under torchrun by test_megatron.py: load an HF model into Megatron at some TP size, export it
back to HF names, and compute full-vocabulary logits on fixed tokens. Rank 0 writes the results
(and, with --region, the exported tensors into a shared-memory weight buffer)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from checkpoint_engine.contracts.weight_region import write_region
from sidecars.megatron import model as mg
from sidecars.megatron.arch import ModelArch
from sidecars.megatron.parallel import ParallelConfig, init_distributed, shutdown


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--region", help="also write the exported tensors into this shm region (EXPORT)")
    args = ap.parse_args()

    init_distributed(ParallelConfig(tensor_parallel=args.tp, expert_parallel=args.ep))
    arch = ModelArch.from_pretrained(args.model)
    model = mg.build_model(arch)
    mg.load_hf_weights(model, mg.read_hf_tensors(args.model), arch)
    exported = mg.export_hf_weights(model, arch)
    tokens = torch.load(Path(args.out) / "tokens.pt")
    model.eval()
    with torch.no_grad():
        logits = mg.forward_logits(model, tokens)
    if dist.get_rank() == 0:
        save_file(exported, str(Path(args.out) / "exported.safetensors"))
        torch.save(logits.cpu(), Path(args.out) / "logits.pt")
        if args.region:
            manifest = write_region(args.region, 1, exported)
            (Path(args.out) / "manifest.json").write_text(json.dumps(manifest.to_dict()))
    shutdown()


if __name__ == "__main__":
    main()
