"""SocketOut: buffers handed to it reach the peer whole and in order, however the socket takes
them; drain waits for a slow reader; a vanished peer closes it instead of raising."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket

from dingyuan.exports.sockout import HIGH_WATER, SocketOut


async def _pair() -> tuple[asyncio.StreamWriter, socket.socket]:
    ours, theirs = socket.socketpair()
    _reader, writer = await asyncio.open_connection(sock=ours)
    return writer, theirs


def test_buffers_arrive_in_order_behind_a_slow_reader() -> None:
    async def main() -> None:
        writer, peer = await _pair()
        out = SocketOut(writer.transport)
        rnd = random.Random(3)
        sent = []
        received = bytearray()
        peer.setblocking(False)
        loop = asyncio.get_running_loop()
        for _ in range(200):
            parts = [
                os.urandom(rnd.choice([0, 1, 7, 4096, 65536, 300_000])) for _ in range(rnd.randint(1, 5))
            ]
            sent += parts
            out.write(*(memoryview(p) if rnd.random() < 0.5 else p for p in parts))
            if out.queued > HIGH_WATER:
                drained = loop.create_task(out.drain())
                while not drained.done():  # read slowly until the writer may go on
                    with contextlib.suppress(BlockingIOError):
                        received += peer.recv(rnd.choice([1000, 65536]))
                    await asyncio.sleep(0)
                assert out.queued <= HIGH_WATER
        total = sum(len(p) for p in sent)
        while len(received) < total:
            try:
                received += peer.recv(1 << 20)
            except BlockingIOError:
                await asyncio.sleep(0.001)
        out.close()
        writer.close()
        peer.close()
        assert bytes(received) == b"".join(sent)

    asyncio.run(main())


def test_a_vanished_peer_closes_the_writer() -> None:
    async def main() -> None:
        writer, peer = await _pair()
        out = SocketOut(writer.transport)
        peer.close()
        for _ in range(100):
            out.write(bytes(1 << 20))
            await asyncio.sleep(0)
            if out.closed:
                break
        await out.drain()  # returns: nothing more will be sent
        assert out.closed and out.queued == 0
        writer.close()

    asyncio.run(main())
