"""A TCP relay that delays every chunk by a fixed one-way delay, for kernels without netem.

Each accepted connection gets one connection to the target. Per direction, a reader stamps
every chunk with `read time + delay` and a writer delivers it at that time, so chunks are
pipelined: a chunk waits for its own timestamp only, never for an earlier chunk's delay.
End of stream is delayed like data; when one side closes, the relay closes the other side
once everything read before the close has been delivered, and that close travels back the
same way. Half-closed connections are not kept open.

Run as `python -m twinfer.deploy.netem.tcp_delay_relay --listen HOST:PORT --target HOST:PORT
--one-way-delay SECONDS [--address-file F]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from pathlib import Path

CHUNK_BYTES = 64 * 1024
# Bytes read but not yet delivered, per direction, before the reader stops reading. It must
# exceed bandwidth * delay or it caps throughput (100 Mbit/s * 40 ms is 500 kB).
MAX_BUFFERED_BYTES = 64 * 1024 * 1024


def split_address(address: str) -> tuple[str, int]:
    """'HOST:PORT' (or '[v6]:PORT') as (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got '{address}'")
    return host.strip("[]") or "0.0.0.0", int(port)


def join_address(host: str, port: int) -> str:
    """(host, port) as 'HOST:PORT', bracketing IPv6 hosts."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Direction:
    """One direction of a relayed connection: read, stamp, hold until due, write."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
        self.reader, self.writer, self.delay_s = reader, writer, delay_s
        self.queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        self.buffered = 0
        self.room = asyncio.Event()
        self.room.set()

    async def read_loop(self) -> None:
        """Read chunks as they come, each stamped with its delivery time; EOF last."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self.room.wait()
                data = await self.reader.read(CHUNK_BYTES)
                if not data:
                    break
                self.queue.put_nowait((loop.time() + self.delay_s, data))
                self.buffered += len(data)
                if self.buffered > MAX_BUFFERED_BYTES:
                    self.room.clear()
        except OSError:
            pass  # a reset counts as the end of the stream
        self.queue.put_nowait((loop.time() + self.delay_s, b""))

    async def write_loop(self) -> bool:
        """Deliver each chunk at its time; True when the stream ended cleanly."""
        loop = asyncio.get_running_loop()
        while True:
            due, data = await self.queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                return True
            try:
                self.writer.write(data)
                await self.writer.drain()
            except OSError:
                return False
            self.buffered -= len(data)
            if self.buffered <= MAX_BUFFERED_BYTES:
                self.room.set()


async def _run_direction(direction: _Direction, source: asyncio.StreamWriter) -> None:
    """Relay one direction; then close its destination (and on errors its source too)."""
    reading = asyncio.create_task(direction.read_loop())
    clean = False
    try:
        clean = await direction.write_loop()
    finally:
        # Closing the destination makes the other direction read EOF, so the close
        # travels back with the same delay; after an error nothing is worth delivering.
        direction.writer.close()
        if not clean:
            source.close()
        reading.cancel()  # finished already after a clean end; after an error, nothing to read for
        await asyncio.gather(reading, return_exceptions=True)


def make_handler(target: tuple[str, int], delay_s: float):
    """A connection handler for asyncio.start_server that relays to `target` with a delay."""

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            target_reader, target_writer = await asyncio.open_connection(*target)
        except OSError as exc:
            print(f"tcp_delay_relay: cannot connect to {join_address(*target)}: {exc}", file=sys.stderr, flush=True)
            client_writer.close()
            return
        up = _Direction(client_reader, target_writer, delay_s)
        down = _Direction(target_reader, client_writer, delay_s)
        try:
            await asyncio.gather(_run_direction(up, client_writer), _run_direction(down, target_writer))
        finally:
            client_writer.close()
            target_writer.close()

    return handle


async def start_relay(listen: str, target: str, delay_s: float) -> asyncio.Server:
    """Listen on `listen` and relay every connection to `target` with `delay_s` each way."""
    if delay_s < 0:
        raise ValueError(f"one-way delay must not be negative, got {delay_s} s")
    host, port = split_address(listen)
    return await asyncio.start_server(make_handler(split_address(target), delay_s), host, port)


def bound_address(server: asyncio.Server) -> str:
    """The address a started relay listens on, port resolved."""
    host, port = server.sockets[0].getsockname()[:2]
    return join_address(host, port)


def _announce(address: str, address_file: str | None) -> None:
    if address_file is None:
        print(f"tcp_delay_relay listening on {address}", flush=True)
        return
    tmp = Path(address_file + ".tmp")
    tmp.write_text(address)
    tmp.rename(address_file)  # readers never see a half-written address


async def _serve(args: argparse.Namespace) -> None:
    server = await start_relay(args.listen, args.target, args.one_way_delay)
    _announce(bound_address(server), args.address_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(prog="python -m twinfer.deploy.netem.tcp_delay_relay", description=__doc__.splitlines()[0])
    p.add_argument("--listen", required=True, help="HOST:PORT to accept on (port 0 picks one)")
    p.add_argument("--target", required=True, help="HOST:PORT to forward each connection to")
    p.add_argument("--one-way-delay", type=float, required=True, help="seconds added to each direction")
    p.add_argument("--address-file", help="write the bound address here once listening")
    args = p.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
