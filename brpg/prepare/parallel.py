"""A bounded ``concurrent.futures`` process pool with a progress bar, for the per-file
conversions.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

from tqdm import tqdm


def parallel_map(
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    *,
    workers: int = 2,
    desc: str = "convert",
    progress: bool = True,
    total: int | None = None,
) -> Iterator[Any]:
    """Yield ``fn(item)`` for every item, in order, using a pool of ``workers`` processes.

    At most ``4 * workers`` items are in flight, so large inputs are not all pickled at once. With
    ``workers <= 1`` everything runs in this process. On an error the pending work is cancelled
    and the error re-raised.
    """
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    bar = tqdm(total=total, desc=desc, unit="file", disable=not progress)
    try:
        if workers <= 1:
            for item in items:
                yield fn(item)
                bar.update()
            return
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures: deque[Future] = deque()
            try:
                for item in items:
                    futures.append(pool.submit(fn, item))
                    if len(futures) >= 4 * workers:
                        yield futures.popleft().result()
                        bar.update()
                while futures:
                    yield futures.popleft().result()
                    bar.update()
            except BaseException:
                for other in futures:
                    other.cancel()
                raise
    finally:
        bar.close()
