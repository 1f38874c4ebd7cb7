"""What grpc does with a burst past a server's HTTP/2 stream limit (docs/flow-control.md).

    python -m bench.refused_streams --server-streams 100 --calls 3000 --client shipped-config

A bare grpc.aio server on 127.0.0.1 (one generic unary method answering after --handler-ms) with
`grpc.max_concurrent_streams` = --server-streams, and one client channel starting --calls unary
calls at once; prints how the calls ended, by code and message. Client kinds: `default` (no
options), `no-retries` (`grpc.enable_retries` 0), `shipped-config` (the Python client's service
config and channel options), `shipped-client` (the hand-written client's call slots on top).
`--pending N` sets the server's `grpc.server.max_pending_requests` (hard limit 2 N).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import time
from typing import Any

import grpc

from logistics.client import _common

METHOD = "/bench.Refused/Call"
CLIENTS = ("default", "no-retries", "shipped-config", "shipped-client")


def _service_config() -> str:
    """The shipped service config, its retry policy applied to this experiment's method too."""
    return _common.service_config_json().replace(
        '{"service": "logistics.ledger.v1.LedgerService"}',
        '{"service": "logistics.ledger.v1.LedgerService"}, {"service": "bench.Refused"}',
    )


async def run(server_streams: int, calls: int, client: str, handler_ms: float, pending: int | None) -> dict[str, int]:
    async def handler(request: bytes, context: Any) -> bytes:
        await asyncio.sleep(handler_ms / 1000)
        return request

    options: list[tuple[str, Any]] = [("grpc.max_concurrent_streams", server_streams)]
    if pending is not None:
        options += [
            ("grpc.server.max_pending_requests", pending),
            ("grpc.server.max_pending_requests_hard_limit", 2 * pending),
        ]
    server = grpc.aio.server(options=options)
    handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {"Call": grpc.unary_unary_rpc_method_handler(handler)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Refused", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel_options: list[tuple[str, Any]] = []
    if client == "no-retries":
        channel_options = [("grpc.enable_retries", 0)]
    elif client in ("shipped-config", "shipped-client"):
        channel_options = [("grpc.service_config", _service_config()), ("grpc.enable_retries", 1)]
    outcomes: collections.Counter[str] = collections.Counter()
    slots = asyncio.Semaphore(_common.DEFAULT_MAX_CONCURRENT_CALLS if client == "shipped-client" else calls)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=channel_options) as channel:
            method: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(METHOD)

            async def one() -> None:
                async with slots:
                    try:
                        await method(b"x", timeout=60)
                        outcomes["OK"] += 1
                    except grpc.aio.AioRpcError as exc:
                        outcomes[f"{exc.code().name}: {(exc.details() or '')[:80]}"] += 1

            await asyncio.gather(*(one() for _ in range(calls)))
    finally:
        await server.stop(0)
    return dict(outcomes)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.refused_streams", description=__doc__)
    parser.add_argument("--server-streams", type=int, default=100)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--client", choices=CLIENTS, default="default")
    parser.add_argument("--handler-ms", type=float, default=20.0)
    parser.add_argument("--pending", type=int, help="the server's grpc.server.max_pending_requests")
    args = parser.parse_args()
    started = time.perf_counter()
    outcomes = asyncio.run(run(args.server_streams, args.calls, args.client, args.handler_ms, args.pending))
    print(f"grpcio {grpc.__version__}, server streams {args.server_streams}, {args.calls} calls, client {args.client}:")
    for outcome, count in sorted(outcomes.items(), key=lambda item: -item[1]):
        print(f"  {count:6d}  {outcome}")
    print(f"  ({time.perf_counter() - started:.2f} s)")


if __name__ == "__main__":
    main()
