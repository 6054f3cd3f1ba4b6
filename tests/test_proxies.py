"""The tests' own TCP proxies close every socket they opened, whenever they are closed.

CI once failed on a ResourceWarning ("unclosed <StreamWriter …>") raised while a browser test ended: the
cutting proxy, closed while a connection had just been accepted, cancelled that connection's task before its
first step, so the task never ran the code that closes the accepted socket. Which test the warning hits
depends on when the garbage collector runs, so it is checked here directly.
"""

from __future__ import annotations

import asyncio
import gc
import warnings
from collections.abc import Callable
from typing import Protocol

import pytest

from tests.browser.cutting_proxy import CuttingProxy
from tests.reply_dropper import ReplyDropper


class _Closable(Protocol):
    port: int

    async def start(self) -> None: ...

    async def close(self) -> None: ...


def _cutting_proxy(target_port: int) -> CuttingProxy:
    return CuttingProxy(target_port, cut_after=None)


async def _unclosed_after_close(make: Callable[[int], _Closable], pause: float) -> list[str]:
    """Open a connection through a fresh proxy, close the proxy `pause` s later; return the warnings the
    garbage collector then raises for sockets nobody closed."""
    held: list[asyncio.StreamWriter] = []  # the target's side, closed by this test itself
    target = await asyncio.start_server(lambda _r, w: held.append(w), "127.0.0.1", 0)
    proxy = make(target.sockets[0].getsockname()[1])
    await proxy.start()
    _, client = await asyncio.open_connection("127.0.0.1", proxy.port)
    await asyncio.sleep(pause)
    await proxy.close()
    client.close()
    await asyncio.sleep(0.01)
    for writer in held:
        writer.close()
    target.close()
    await target.wait_closed()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
    return [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


@pytest.mark.parametrize("make", [_cutting_proxy, ReplyDropper], ids=["cutting-proxy", "reply-dropper"])
@pytest.mark.parametrize("pause", [0.0, 0.001, 0.05], ids=["at-accept", "while-connecting", "while-relaying"])
async def test_a_proxy_closed_mid_connection_leaves_no_socket_open(
    make: Callable[[int], _Closable], pause: float
) -> None:
    leaked: list[str] = []
    for _ in range(5):
        leaked += await _unclosed_after_close(make, pause)
    assert leaked == []
