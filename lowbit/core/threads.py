"""``torch_threads(n)``: run a block at ``n`` torch intra-op threads, restoring the count after.

Used where a result must not depend on the thread count (LAPACK's blocked Cholesky splits its
trailing updates by thread, so its float sums change with the count) and for timing at a fixed
count. ``torch.set_num_threads`` acts on the calling thread's OpenMP setting and MKL's."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
