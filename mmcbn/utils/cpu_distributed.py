"""Distributed training on CPU-only machines with mmengine's pytorch launcher."""
import torch
import torch.distributed as dist


def setup_cpu_distributed(cfg) -> bool:
    """On a machine without CUDA, prepares ``cfg`` (launcher 'pytorch') to run on gloo.

    mmengine's pytorch launcher calls ``torch.cuda.set_device`` and mmdet's runtime asks for NCCL,
    and the default DDP wrapper gets ``device_ids=[LOCAL_RANK]``: all three need GPUs. This
    initialises the process group with gloo from torchrun's environment (mmengine then keeps it) and
    makes DDP wrap the CPU model (``device_ids=None``).

    Returns:
        Whether anything was changed.
    """
    if cfg.get('launcher', 'none') != 'pytorch' or torch.cuda.is_available():
        return False
    cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})['backend'] = 'gloo'
    if not dist.is_initialized():
        dist.init_process_group(backend='gloo', init_method='env://')
    wrapper = dict(type='MMDistributedDataParallel', broadcast_buffers=False,
                   find_unused_parameters=cfg.get('find_unused_parameters', False))
    wrapper.update(cfg.get('model_wrapper_cfg') or {})
    wrapper['device_ids'] = None
    cfg.model_wrapper_cfg = wrapper
    return True


def finish_distributed() -> None:
    """Waits for every process and destroys the process group, if one is initialised.

    Without it a gloo process can abort at interpreter exit ("terminate called without an active
    exception") after a successful run, which torchrun reports as a failure.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
