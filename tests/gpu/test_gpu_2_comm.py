"""labkit.CommCounter on CUDA tensors: the same ledger as on the CPU.

The same rank function runs twice on 2 ranks, once with its tensors on the CPU and once on the
GPU (gloo with the ranks sharing one GPU, or NCCL with a GPU each); every call's op name, payload
bytes, ring-model wire bytes, world size and peer must agree. Under gloo the point-to-point calls
go through host memory, which must not change what the ledger records.
"""
import torch
import torch.distributed as dist

import labkit
from labkit.compat import all_gather_into_tensor, reduce_scatter_tensor

from ._util import LAUNCH_TIMEOUT, timeout

ELEMS = 12   # float32: 48 bytes per rank
FP32 = 4


def ledger_of_each_op():
    """Runs in each rank: (device, backend, every call as a plain tuple, the summary's ops,
    the DDP step's all-reduced bytes and its parameter count)."""
    from labkit.comm import CommCounter
    rank, n = dist.get_rank(), dist.get_world_size()
    where = labkit.device()
    x = torch.full((ELEMS,), float(rank), device=where)
    with CommCounter() as ledger:
        dist.all_reduce(x.clone())
        dist.all_reduce(x.half())
        dist.all_reduce(x.clone(), async_op=True).wait()
        dist.broadcast(x.clone(), src=0)
        dist.all_gather([torch.empty(ELEMS, device=where) for _ in range(n)], x)
        all_gather_into_tensor(torch.empty(n * ELEMS, device=where), x)
        reduce_scatter_tensor(torch.empty(ELEMS, device=where), x.repeat(n))
        got = torch.empty(ELEMS, device=where)
        request = dist.isend(x, (rank + 1) % n)
        dist.recv(got, (rank - 1) % n)
        request.wait()
        if where.type == "cuda":
            torch.cuda.synchronize()
    calls = [(c.op, c.payload_bytes, c.wire_bytes, c.world_size, c.peer) for c in ledger.calls]

    torch.manual_seed(0)   # the same model on every rank and on both devices
    model = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    ids = [where] if where.type == "cuda" else None
    ddp = torch.nn.parallel.DistributedDataParallel(model.to(where), device_ids=ids)
    with CommCounter() as step:
        ddp(torch.ones(4, 32, device=where)).square().mean().backward()
        if where.type == "cuda":
            torch.cuda.synchronize()
    psi = sum(p.numel() for p in model.parameters())
    return (str(where), dist.get_backend(), calls, list(ledger.summary()),
            step.summary()["all_reduce"]["payload_bytes"], psi)


@timeout(4 * LAUNCH_TIMEOUT)
def test_comm_counter_on_cuda_records_what_it_records_on_the_cpu():
    on_cpu = labkit.launch(ledger_of_each_op, 2, device="cpu", timeout=LAUNCH_TIMEOUT, quiet=True)
    on_gpu = labkit.launch(ledger_of_each_op, 2, device="cuda", timeout=LAUNCH_TIMEOUT,
                           quiet=True)
    for rank, (cpu, gpu) in enumerate(zip(on_cpu, on_gpu)):
        assert cpu[0] == "cpu" and gpu[0].startswith("cuda"), (cpu[0], gpu[0])
        assert gpu[1] in ("gloo", "nccl")
        assert cpu[3] == gpu[3] == ["all_reduce", "broadcast", "all_gather", "reduce_scatter",
                                    "send", "recv"], (cpu[3], gpu[3])
        assert gpu[2] == cpu[2], f"rank {rank}: on {gpu[0]} ({gpu[1]}) the ledger says\n" \
                                 f"{gpu[2]}\non the CPU\n{cpu[2]}"
        S = ELEMS * FP32
        assert gpu[2][0] == ("all_reduce", S, 2 * 1 / 2 * S, 2, None)
        assert gpu[2][1][:2] == ("all_reduce", S // 2)       # fp16: half the bytes
        assert gpu[2][-2:] == [("send", S, float(S), 2, (rank + 1) % 2),
                               ("recv", S, 0.0, 2, (rank - 1) % 2)]
        # DDP's step all-reduces exactly the fp32 gradients, on either device
        assert gpu[4] == cpu[4] == FP32 * gpu[5], (gpu[4], cpu[4], gpu[5])
