"""The server's listening socket: connections accepted on it send small writes at once
(TCP_NODELAY). Without it a keep-alive client waited ~40 ms for each response (Nagle's
algorithm holding the body until the client's delayed ACK of the headers)."""

from __future__ import annotations

import asyncio
import socket

from loom.runtime.http.launch import bind_socket


def test_accepted_connections_have_nodelay() -> None:
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    seen: list[int] = []

    async def main() -> None:
        async def handle(reader, writer) -> None:
            conn = writer.get_extra_info("socket")
            seen.append(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(handle, sock=sock)
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await reader.read()  # the handler closed it
            writer.close()

    asyncio.run(main())
    assert seen and seen[0] != 0


def test_port_in_use_is_a_clear_error() -> None:
    first = bind_socket("127.0.0.1", 0)
    first.listen()
    try:
        bind_socket("127.0.0.1", first.getsockname()[1])
    except SystemExit as e:
        assert "pick another --port" in str(e)
    else:
        raise AssertionError("binding a used port did not fail")
    finally:
        first.close()
