"""Process-group helpers of ``parallel_state``: the world group's timeout and a default timeout
for groups that other code (NxD) creates."""
from __future__ import annotations

import contextlib
import datetime
import functools
from typing import Optional

import torch.distributed as dist

from nxd_cp.compat import torch as torch_compat


def world_timeout() -> Optional[datetime.timedelta]:
    """The timeout of the default (world) process group, None if it cannot be read."""
    return torch_compat.world_timeout()


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
