"""The gateway's send window: requests arriving within one window reach the producer together.

Windows here are long (0.5 s) against the gaps between requests (10 ms), so that a busy
machine pausing the test for a moment does not split or merge windows."""

from __future__ import annotations

import asyncio

from ingest_gateway.gateway import SendWindow

LINGER = 0.5


def test_requests_in_one_window_are_released_together_after_the_linger() -> None:
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        window = SendWindow(LINGER)
        released: list[float] = []

        async def request(delay: float) -> None:
            await asyncio.sleep(delay)
            await window.wait()
            released.append(loop.time())

        start = loop.time()
        await asyncio.gather(request(0), request(0.01), request(0.02))
        return [t - start for t in released]

    released = asyncio.run(main())
    assert len(released) == 3
    assert min(released) >= LINGER
    assert max(released) - min(released) < LINGER / 2  # one window, not one per request


def test_a_request_after_the_window_closed_opens_the_next_one() -> None:
    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        window = SendWindow(LINGER / 5)
        start = loop.time()
        await window.wait()
        first = loop.time() - start
        await window.wait()
        return first, loop.time() - start

    first, second = asyncio.run(main())
    assert first >= LINGER / 5
    assert second - first >= LINGER / 5


def test_a_cancelled_request_leaves_the_others_waiting_for_their_window() -> None:
    async def main() -> tuple[bool, bool, bool]:
        window = SendWindow(LINGER)
        gone = asyncio.create_task(window.wait())
        stays = asyncio.create_task(window.wait())
        await asyncio.sleep(0.01)
        gone.cancel()
        await asyncio.sleep(0.01)
        early = stays.done()
        await asyncio.wait_for(stays, timeout=5)
        return early, gone.cancelled(), stays.cancelled()

    early, cancelled, other_cancelled = asyncio.run(main())
    assert cancelled
    assert not early
    assert not other_cancelled


def test_no_linger_means_no_wait() -> None:
    async def main() -> bool:
        task = asyncio.create_task(SendWindow(0).wait())
        await asyncio.sleep(0)
        return task.done()

    assert asyncio.run(main())
