"""Broker doors of the sequencer (SPEC 16): ingress bridges from RabbitMQ and NATS JetStream,
each off unless its URL is configured (docs/brokers.md)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from sequencer.bridges.amqp import AmqpBridge
from sequencer.bridges.delivery import Bridged
from sequencer.bridges.jetstream import NatsBridge
from sequencer.config import BrokerSettings
from sequencer.ingress import Ingress
from sequencer.metrics import SequencerMetrics

log = logging.getLogger(__name__)
RESTART_AFTER = 5.0


@dataclass
class Bridges:
    """The configured bridges and their background tasks."""

    amqp: AmqpBridge | None = None
    nats: NatsBridge | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    def build(cls, ingress: Ingress, settings: BrokerSettings, metrics: SequencerMetrics) -> Bridges:
        bridges = cls()
        if settings.amqp_url:
            bridges.amqp = AmqpBridge(Bridged("amqp", ingress, settings, metrics), settings)
        if settings.nats_url:
            bridges.nats = NatsBridge(Bridged("nats", ingress, settings, metrics), settings)
        return bridges

    def start(self) -> None:
        for name, bridge in (("amqp-bridge", self.amqp), ("nats-bridge", self.nats)):
            if bridge is not None:
                self.tasks.append(asyncio.create_task(_supervised(name, bridge), name=name))

    async def close(self) -> None:
        """Stops consuming first (before the ingress closes), so no delivery is refused for a
        shutdown: whatever was not acked is redelivered to the next process."""
        for bridge in (self.amqp, self.nats):
            if bridge is not None:
                await bridge.close()
        for task in self.tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self.tasks, return_exceptions=True)


async def _supervised(name: str, bridge: AmqpBridge | NatsBridge) -> None:
    """Runs a bridge; an unexpected failure (the clients reconnect by themselves, so this is a
    defect or a refused declaration) is logged and the bridge starts over after a pause, so a
    door never closes silently."""
    while True:
        try:
            await bridge.run()
            return  # closed
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("broker bridge failed; starting it again", extra={"bridge": name, "retry_in": RESTART_AFTER})
            await bridge.close()
            bridge.reset()
            await asyncio.sleep(RESTART_AFTER)
