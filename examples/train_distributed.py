"""Pre-train a tiny MLRA GPT-2 on a 2-D mesh: FSDP2 over "dp" × tensor parallelism over "tp".

    torchrun --nproc-per-node 4 examples/train_distributed.py            # 2 × 2 mesh, CPU (gloo) or GPUs (NCCL)
    torchrun --nproc-per-node 4 examples/train_distributed.py --resume   # continue from the last checkpoint

Order as torchtitan's: tensor parallelism, activation checkpointing, torch.compile (per block), FSDP2.
The text is the package's own source, as bytes. Checkpoints are torch.distributed.checkpoint (DCP)
folders <out>/step-N; TEV is logged to <out>/tev.jsonl. Without --resume, an --out that already holds
either is refused: nothing of an earlier run is overwritten or left to be resumed by mistake.
"""

import argparse
import glob
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from mlra_kernels import TEVMonitor
from mlra_kernels.distributed import tensor_parallel
from mlra_kernels.models import GPT2, GPT2Config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", type=int, default=2, help="tensor-parallel degree (divides the world size and n_head)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--save-every", type=int, default=10)
    ap.add_argument("--out", default="runs/train_distributed")
    ap.add_argument("--resume", action="store_true", help="load the last checkpoint in --out first")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (faster start on a CPU)")
    args = ap.parse_args()
    # Before the process group forms, so that every rank stops here and none has written yet.
    held = sorted(glob.glob(os.path.join(args.out, "step-*")))
    held += [os.path.join(args.out, "tev.jsonl")] if os.path.exists(os.path.join(args.out, "tev.jsonl")) else []
    if held and not args.resume:
        ap.error(f"--out {args.out} already holds a run ({', '.join(os.path.basename(p) for p in held)}): pass "
                 "--resume to continue it, or choose another --out")

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world // args.tp, args.tp), mesh_dim_names=("dp", "tp"))

    torch.manual_seed(0)  # the same initial weights on every rank
    cfg = GPT2Config(vocab_size=256, block_size=64, n_layer=4, n_head=4, n_embd=64, attention="mlra",
                     rank=16, latent_groups=2)
    model = tensor_parallel(GPT2(cfg).to(device), mesh["tp"])
    for i, block in enumerate(model.h):
        block = checkpoint_wrapper(block)  # activation checkpointing; state-dict keys keep their names
        if not args.no_compile:
            block.compile()
        model.h[i] = block
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    import mlra_kernels
    files = sorted(glob.glob(os.path.join(os.path.dirname(mlra_kernels.__file__), "**", "*.py"), recursive=True))
    blob = bytearray()
    for f in files:
        with open(f, "rb") as fh:
            blob += fh.read()
    text = torch.frombuffer(blob, dtype=torch.uint8).long()

    start, saved = 0, sorted(glob.glob(os.path.join(args.out, "step-*")), key=lambda p: int(p.rsplit("-", 1)[1]))
    if args.resume and saved:
        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": optim_sd, "step": 0}
        dcp.load(state, checkpoint_id=saved[-1])
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        start = state["step"]
    # On every rank: the embedding is a DTensor sharded over "dp", merged exactly; rank 0 writes the log.
    monitor = TEVMonitor(model, every=5, path=os.path.join(args.out, "tev.jsonl"), mode="a" if args.resume else "w")

    dp = mesh["dp"].get_local_rank()
    for step in range(start, args.steps):
        data = torch.Generator().manual_seed(step)  # one batch per step, the same on every rank after a resume
        at = torch.randint(0, len(text) - cfg.block_size - 1, (8, 1), generator=data) + torch.arange(cfg.block_size + 1)
        idx = text[at].chunk(world // args.tp)[dp].to(device)  # each "dp" rank its part; "tp" ranks the same
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        loss = loss.detach()
        dist.all_reduce(loss, op=dist.ReduceOp.AVG, group=mesh["dp"].get_group())
        rec = monitor.step(step, loss=loss)
        if rank == 0 and rec is not None:
            print(f"step {step:3d}  loss {rec['loss']:.4f}  tev {rec['tev_mean']:.5f} ± {rec['tev_std']:.5f}")
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            model_sd, optim_sd = get_state_dict(model, opt)
            dcp.save({"model": model_sd, "optim": optim_sd, "step": step + 1},
                     checkpoint_id=os.path.join(args.out, f"step-{step + 1}"))
    monitor.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
