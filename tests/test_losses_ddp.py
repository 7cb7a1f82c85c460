"""Under DDP the KD denominator is the whole step's: two ranks with different teacher coverage
(CE-only text lines beside KD records) make the same update as one process."""

from __future__ import annotations

import gc
import os

import torch
import torch.multiprocessing as mp

from conftest import free_port


def _train(tok_dir: str, accum: int, out: str, rank: int = 0, world: int = 1, port: int = 0) -> None:
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from kdforge.train.checkpoint import TrainState
    from kdforge.train.data_stream import DataStream
    from kdforge.train.loop import LoopConfig, train_steps
    from kdforge.train.objective import DistillObjective
    from kdforge.train.schedule import make_scheduler
    from test_losses_norm import _dataset, _model

    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    ds = _dataset(tok)
    model = _model(tok)
    obj = DistillObjective(model, "fkl")
    if world > 1:
        obj = torch.nn.parallel.DistributedDataParallel(obj)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    train_steps(obj, opt, make_scheduler(opt, "constant", 0, None), DataStream(ds, 1, seed=3), TrainState(),
                LoopConfig(grad_accum=accum, grad_clip=None, kind="fkl", kd_weight=0.5),
                until_step=2, seq_len_at=lambda s: 64)
    if rank == 0:
        torch.save(model.state_dict(), out)
    if world > 1:
        # as Session.close does: free DDP's reducer while the group lives, then destroy it. Left to
        # the function's return, the reducer's destructor joins gloo's thread holding the GIL while
        # that thread waits for the GIL to free a tensor: rank 0 hung forever (seen in a full run)
        dist.barrier()
        del obj
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def _rank(rank, tok_dir, accum, out, world, port):
    _train(tok_dir, accum, out, rank, world, port)


def test_two_ranks_with_uneven_coverage_equal_one_process(tmp_path, tokenizer_dir):
    one, two = str(tmp_path / "one.pt"), str(tmp_path / "two.pt")
    _train(str(tokenizer_dir), 6, one)
    mp.spawn(_rank, args=(str(tokenizer_dir), 3, two, 2, free_port()), nprocs=2, join=True)
    a, b = torch.load(one), torch.load(two)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
