"""The gateway's send window: requests arriving within one window reach the producer together."""

from __future__ import annotations

import asyncio

from ingest_gateway.app import SendWindow


def test_requests_in_one_window_are_released_together_after_the_linger() -> None:
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        window = SendWindow(0.05)
        released: list[float] = []

        async def request(delay: float) -> None:
            await asyncio.sleep(delay)
            await window.wait()
            released.append(loop.time())

        start = loop.time()
        await asyncio.gather(request(0), request(0.01), request(0.03))
        return [t - start for t in released]

    released = asyncio.run(main())
    assert len(released) == 3
    assert min(released) >= 0.05
    assert max(released) - min(released) < 0.005  # one window, one hand-over


def test_a_request_after_the_window_closed_opens_the_next_one() -> None:
    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        window = SendWindow(0.02)
        start = loop.time()
        await window.wait()
        first = loop.time() - start
        await window.wait()
        return first, loop.time() - start

    first, second = asyncio.run(main())
    assert 0.02 <= first < second
    assert second >= 0.04


def test_a_cancelled_request_leaves_the_others_waiting_for_their_window() -> None:
    async def main() -> tuple[bool, bool]:
        window = SendWindow(0.03)
        gone = asyncio.create_task(window.wait())
        stays = asyncio.create_task(window.wait())
        await asyncio.sleep(0.005)
        gone.cancel()
        await asyncio.sleep(0)
        early = stays.done()
        await asyncio.wait_for(stays, timeout=1)
        return early, gone.cancelled()

    early, cancelled = asyncio.run(main())
    assert not early
    assert cancelled


def test_no_linger_means_no_wait() -> None:
    async def main() -> bool:
        task = asyncio.create_task(SendWindow(0).wait())
        await asyncio.sleep(0)
        return task.done()

    assert asyncio.run(main())
