"""labkit.MemoryTracer against torch's CUDA allocator, on known allocations.

Every tensor here is a multiple of 512 bytes (a 512 x 512 float32 weight is 1 MiB, a 256 x 512
activation 512 KiB), so the caching allocator's rounding (each block up to a multiple of 512 B)
adds nothing, and the tracer's live bytes and peak must equal the allocator's
(``torch.cuda.memory_allocated`` and ``max_memory_allocated``), as differences from the start of
the ``with``, within 512 B per tensor for the few scalars torch may make. cuBLAS's workspaces,
which the allocator holds and no tensor owns, are allocated by a warm-up first (one per thread:
the forward's and the autograd thread's), so they sit in both baselines.
"""
import gc

import torch
import torch.nn as nn

from labkit.memory import MemoryTracer

from ._util import timeout

WIDTH, BATCH = 512, 256
MiB, KiB = 2 ** 20, 2 ** 10
WEIGHT, ACTIVATION = WIDTH * WIDTH * 4, BATCH * WIDTH * 4      # 1 MiB, 512 KiB
SLACK = 512 * 32   # 512 B for each of up to 32 tensors; any missed tensor here is >= 512 KiB


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(WIDTH, WIDTH, bias=False), nn.ReLU(),
                         nn.Linear(WIDTH, WIDTH, bias=False)).cuda()


def forward_backward(model):
    """Forward and backward with sizes that are all multiples of 512 B (no scalar loss)."""
    x = torch.ones(BATCH, WIDTH, device="cuda")
    out = model(x)
    out.backward(torch.ones_like(out))
    return x


def warm_up(adam: bool):
    """The same work once outside any tracer: cuBLAS's workspaces, Adam's code paths."""
    model = mlp()
    forward_backward(model)
    if adam:
        torch.optim.Adam(model.parameters()).step()
    torch.cuda.synchronize()


def measured(model, optimizer, work):
    """Run ``work`` in a tracer; the tracer's and the allocator's live and peak bytes, each as a
    difference from the start, and the tracer's categories at the end."""
    gc.collect()                    # nothing left over from the warm-up to be freed meanwhile
    torch.cuda.synchronize()
    allocated_before = torch.cuda.memory_allocated()
    with MemoryTracer(model, optimizer, device="cuda") as mem:
        traced_before = sum(mem.current.values())
        work()
        torch.cuda.synchronize()
    allocated_after = torch.cuda.memory_allocated()
    assert mem.cuda_allocated == allocated_after, (mem.cuda_allocated, allocated_after)
    assert mem.cuda_peak >= mem.peak_total   # the allocator also holds cuBLAS's workspaces
    traced = {"live": sum(mem.current.values()) - traced_before,
              "peak": mem.peak_total - traced_before}
    cuda = {"live": allocated_after - allocated_before, "peak": mem.cuda_peak - allocated_before}
    print(f"traced {traced}, torch.cuda {cuda}; at the end {mem.current}; peak at "
          f"{mem.peak_event}")
    return traced, cuda, mem.current


def assert_same_bytes(traced, cuda):
    for key in ("live", "peak"):
        assert 0 <= cuda[key] - traced[key] <= SLACK, \
            f"{key}: traced {traced[key]:,} B, torch.cuda {cuda[key]:,} B"


@timeout(120)
def test_tracer_live_and_peak_cuda_bytes_match_torch_cuda_forward_backward():
    warm_up(adam=False)
    model = mlp()
    kept = []
    traced, cuda, current = measured(model, None, lambda: kept.append(forward_backward(model)))
    assert current["params"] == 2 * WEIGHT and current["grads"] == 2 * WEIGHT, current
    assert current["activations"] == 0, current          # released by backward
    assert traced["live"] == 2 * WEIGHT + ACTIVATION     # the grads, and x (still referenced)
    # the peak, over the parameters: at least x, the output, its gradient, a weight's gradient
    assert traced["peak"] >= 3 * ACTIVATION + WEIGHT, traced
    assert_same_bytes(traced, cuda)


@timeout(120)
def test_tracer_live_and_peak_cuda_bytes_match_torch_cuda_adam_step():
    warm_up(adam=True)
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters())

    def step():
        forward_backward(model)
        optimizer.step()
        optimizer.zero_grad()       # set_to_none: the grads are freed

    traced, cuda, current = measured(model, optimizer, step)
    # Adam's exp_avg and exp_avg_sq, 2 x 1 MiB per weight; its step counters stay on the CPU
    # unless this torch made Adam fused or capturable by default (then 4 B each on the GPU)
    state = sum(t.untyped_storage().nbytes() for s in optimizer.state.values()
                for t in s.values() if torch.is_tensor(t) and t.is_cuda)
    assert 4 * WEIGHT <= state <= 4 * WEIGHT + 8 * len(optimizer.state), state
    assert current["optimizer"] == state and current["grads"] == 0, current
    assert traced["live"] == state, traced
    assert_same_bytes(traced, cuda)
