"""Process-group helpers of ``parallel_state``: the world group's timeout, a default timeout for
groups that other code (NxD) creates, NxD's CPU mode and its platform target.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import os
from typing import Optional

import torch.distributed as dist


_LOGGED: set = set()


def log_once(msg: str) -> None:
    """Log a warning the first time this exact message comes up in the process."""
    if msg not in _LOGGED:
        _LOGGED.add(msg)
        logging.getLogger("nxd_cp.parallel_state").warning(msg)


def nxd_cpu_mode() -> bool:
    """NxD's CPU mode (``NXD_CPU_MODE`` > 0, NxD's own rule): NxD builds gloo groups."""
    try:
        return int(os.environ.get("NXD_CPU_MODE", "0")) > 0
    except ValueError:
        return False


def platform_target() -> Optional[str]:
    """NxD's platform target (its layout depends on it), None off Neuron."""
    try:
        from torch_neuronx.utils import get_platform_target
        return get_platform_target()
    except Exception:  # noqa: BLE001 - absent off Neuron
        return None


def world_timeout() -> Optional[datetime.timedelta]:
    """The timeout of the default (world) process group, None if it cannot be read."""
    try:
        pg = dist.distributed_c10d._get_default_group()
        for dev in pg._device_types:
            t = getattr(getattr(pg._get_backend(dev), "options", None), "_timeout", None)
            if isinstance(t, datetime.timedelta):
                return t
    except Exception:  # noqa: BLE001 - private API; torch's default applies then
        return None
    return None


@contextlib.contextmanager
def new_group_timeout(timeout: Optional[datetime.timedelta]):
    """Make ``torch.distributed.new_group`` default to ``timeout`` while NxD builds its groups
    (NxD's ``new_group`` calls pass none, so they would get torch's 30-minute default)."""
    if timeout is None:
        yield
        return
    original = dist.new_group

    @functools.wraps(original)
    def new_group(*args, **kwargs):
        kwargs.setdefault("timeout", timeout)
        return original(*args, **kwargs)

    dist.new_group = new_group
    try:
        yield
    finally:
        dist.new_group = original
