"""labkit.stages: the reference DDP and ZeRO-1/2/3 train like one process with Adam.

Real tensors on 2 real gloo ranks: after two steps every rank's parameters equal those of
plain Adam on the whole batch in one process (fp32), and every rank holds the same ones. The
layers are sized so that the flat buffers need padding (21 parameters in the second layer).
Their bytes are tested in test_simulate.py.
"""
import pytest
import torch
import torch.distributed as dist

import labkit
from labkit import stages

LOCAL_BATCH, STEPS, LR = 3, 2, 1e-2


def small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(),
                               torch.nn.Linear(7, 3, bias=False))


def batches(world):
    data = torch.Generator().manual_seed(1)
    return [torch.randn(world * LOCAL_BATCH, 5, generator=data) for _ in range(STEPS)]


def train_on_ranks(stage, mixed=False):
    rank, world = dist.get_rank(), dist.get_world_size()
    model = small_model()
    impl = stages.STAGES[stage](model, torch.optim.Adam, mixed=mixed, lr=LR,
                                **({"bucket_bytes": 64} if stage == 2 else {}))
    for x in batches(world):
        impl.zero_grad()
        model(x[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH]).square().mean().backward()
        impl.step()
    if stage == 3:                       # the full parameters, for the comparison
        for i in range(len(impl.units)):
            impl._all_gather(i)
    return [p.detach().clone() for p in model.parameters()]


def train_one_process(world):
    model = small_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    for x in batches(world):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_stage_trains_like_adam_in_one_process(stage):
    reference = train_one_process(2)
    ranks = labkit.launch(train_on_ranks, nprocs=2, args=(stage,), quiet=True)
    for params in ranks:
        for got, want in zip(params, reference):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_stage_2_buckets_follow_backward_order():
    with _fake_group(2, 0):
        impl = stages.ZeRO2(small_model(), torch.optim.Adam, bucket_bytes=64)
        sizes = [[p.shape for p in piece] for piece in impl.pieces]
    assert sizes == [[(3, 7)], [(7,)], [(7, 5)]]      # last layer first; > 64 B: own bucket
    assert [f.numel() for f in impl.flats] == [22, 8, 36]   # each padded to a multiple of 2


def test_stage_3_units_and_shards():
    with _fake_group(4, 3):
        model = small_model()
        impl = stages.ZeRO3(model, torch.optim.Adam)
        assert impl.units == [model[0], model[2]]
        assert [s.numel() for s in impl.shards] == [11, 6]   # ceil(42/4), ceil(21/4)
        assert all(f.untyped_storage().nbytes() == 0 for f in impl.flats)   # freed
        with pytest.raises(ValueError, match="exactly one unit"):
            stages.ZeRO3(small_model(), torch.optim.Adam, units=[model[0]])


class _fake_group:
    def __init__(self, world, rank):
        self.world, self.rank = world, rank

    def __enter__(self):
        from labkit._torch_private import FakeStore
        dist.init_process_group("fake", store=FakeStore(), rank=self.rank, world_size=self.world)

    def __exit__(self, *exc):
        dist.destroy_process_group()
