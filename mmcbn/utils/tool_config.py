"""The config loading shared by tools/train.py and tools/test.py (as mmdet's tools do it)."""
import os.path as osp
from typing import Optional

from mmengine.config import Config

from .cpu_distributed import setup_cpu_distributed


def load_tool_config(config_path: str, launcher: str = 'none', cfg_options: Optional[dict] = None,
                     work_dir: Optional[str] = None) -> Config:
    """Loads ``config_path``, merges ``cfg_options``, sets the launcher and the work dir
    (``./work_dirs/<config name>`` unless given or set in the config), and on a machine without CUDA
    prepares the pytorch launcher for gloo and CPU DDP."""
    cfg = Config.fromfile(config_path)
    cfg.launcher = launcher
    if cfg_options is not None:
        cfg.merge_from_dict(cfg_options)
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(config_path))[0])
    setup_cpu_distributed(cfg)
    return cfg
