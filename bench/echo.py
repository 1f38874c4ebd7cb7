"""The transport ceiling: a raw grpc.aio server with one unary method that echoes its request
bytes. No interceptors, no database, no protobuf parsing: what gRPC in Python costs alone.

`python -m bench.echo` binds 127.0.0.1:0 and prints {"port": N} on stdout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal

import grpc

SERVICE = "bench.v1.EchoService"
METHOD = f"/{SERVICE}/Echo"


async def _echo(request: bytes, _context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return request


def _identity(value: bytes) -> bytes:
    return value


async def serve() -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    handler = grpc.unary_unary_rpc_method_handler(_echo, request_deserializer=_identity, response_serializer=_identity)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Echo": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(json.dumps({"port": port}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


def main() -> None:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main()
