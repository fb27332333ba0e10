"""Runs a function in several gloo processes on 127.0.0.1 with a free port, always ending."""
import multiprocessing
import os
import socket
import traceback
from datetime import timedelta


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _entry(fn, rank, world_size, port, args, errors):
    import torch.distributed as dist
    os.environ.setdefault('OMP_NUM_THREADS', '1')
    try:
        dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=60))
        fn(rank, world_size, *args)
    except BaseException:  # reported to the parent, which fails the test
        errors.put(f'rank {rank}:\n{traceback.format_exc()}')
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_in_processes(fn, world_size, *args, timeout=240):
    """Runs ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes; raises on any
    failure or when they do not finish within ``timeout`` seconds (they are then killed)."""
    ctx = multiprocessing.get_context('spawn')
    errors = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, args, errors))
             for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
        p.join()
    messages = []
    while not errors.empty():
        messages.append(errors.get())
    if alive:
        raise TimeoutError(f'{len(alive)} process(es) did not finish in {timeout} s')
    if messages or any(p.exitcode != 0 for p in procs):
        raise RuntimeError('\n'.join(messages) or f'exit codes {[p.exitcode for p in procs]}')
