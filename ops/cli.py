"""The operator CLI: `python -m ops gaps | parked | blocked | entity | status | watch | skip |
retry | webhooks` over gRPC, through `logistics.client`, with the same credentials as any caller.

Tables for people, `--json` (proto3 JSON, the field names buf curl prints) for scripts, and exit
statuses that say what happened (EXIT_* below; docs/cli.md lists them). Long listings show a
progress count on stderr when stderr is a terminal, never in a pipe or a file.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import re
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any, TextIO, TypeVar

import grpc
from google.protobuf import duration_pb2, json_format, timestamp_pb2
from google.protobuf.message import Message

from logistics import client as lc
from logistics.sequencer.v1 import sequencer_pb2

EXIT_OK = 0
#: Anything else: an INTERNAL answer, an unexpected failure.
EXIT_ERROR = 1
#: The command line (or a LOGISTICS_* variable) is wrong; nothing was sent.
EXIT_USAGE = 2
#: The entity, transaction, subscription or delivery does not exist (NOT_FOUND).
EXIT_NOT_FOUND = 3
#: The server refused the request (INVALID_ARGUMENT, FAILED_PRECONDITION, ALREADY_EXISTS,
#: RESOURCE_EXHAUSTED, OUT_OF_RANGE, ABORTED): its reason is printed; nothing changed.
EXIT_REFUSED = 4
#: The server could not be reached or did not answer in time (UNAVAILABLE, DEADLINE_EXCEEDED).
EXIT_UNAVAILABLE = 5
#: The server does not implement this RPC (UNIMPLEMENTED: a server older than this CLI).
EXIT_UNIMPLEMENTED = 6
#: The credentials are missing or do not allow this call (UNAUTHENTICATED, PERMISSION_DENIED).
EXIT_ACCESS = 7

#: The exit status of a failed call, by its gRPC code (others: EXIT_ERROR).
EXIT_STATUSES = {
    grpc.StatusCode.NOT_FOUND: EXIT_NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT: EXIT_REFUSED,
    grpc.StatusCode.FAILED_PRECONDITION: EXIT_REFUSED,
    grpc.StatusCode.ALREADY_EXISTS: EXIT_REFUSED,
    grpc.StatusCode.RESOURCE_EXHAUSTED: EXIT_REFUSED,
    grpc.StatusCode.OUT_OF_RANGE: EXIT_REFUSED,
    grpc.StatusCode.ABORTED: EXIT_REFUSED,
    grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: EXIT_UNAVAILABLE,
    grpc.StatusCode.UNIMPLEMENTED: EXIT_UNIMPLEMENTED,
    grpc.StatusCode.UNAUTHENTICATED: EXIT_ACCESS,
    grpc.StatusCode.PERMISSION_DENIED: EXIT_ACCESS,
}

#: Items per ListX call: the servers' maximum page size.
PAGE_SIZE = 500
#: Characters an idempotency key may hold (the sequencer's key charset).
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9._:~@/+=-]")

ItemT = TypeVar("ItemT")


class Usage(Exception):
    """A command-line mistake found after parsing (exit EXIT_USAGE)."""


# Output.


def to_json(message: Message) -> dict[str, Any]:
    """proto3 JSON: camelCase names, enum names, 64-bit integers as strings (as buf curl)."""
    return json_format.MessageToDict(message)


def emit_json(document: dict[str, Any], out: TextIO) -> None:
    out.write(json.dumps(document, indent=2, sort_keys=False) + "\n")


def when(message: timestamp_pb2.Timestamp, present: bool) -> str:
    if not present:
        return "-"
    return message.ToDatetime(tzinfo=dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def age(message: duration_pb2.Duration) -> str:
    seconds = int(message.ToTimedelta().total_seconds())
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def entity_text(ref: Any) -> str:
    return f"{lc.EntityType(ref.entity_type).name.lower()}/{ref.entity_id}"


def state_text(number: int) -> str:
    try:
        return lc.EventState(number).name
    except ValueError:
        return str(number)


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], out: TextIO) -> None:
    """Left-aligned columns, one header line; `(none)` for an empty listing."""
    cells = [[str(cell) for cell in row] for row in rows]
    if not cells:
        out.write("(none)\n")
        return
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]
    for row in [list(headers), *cells]:
        out.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() + "\n")


def fields(pairs: Iterable[tuple[str, object]], out: TextIO) -> None:
    """One `name: value` line per field (for one record)."""
    pairs = list(pairs)
    width = max(len(name) for name, _ in pairs)
    for name, value in pairs:
        out.write(f"{name + ':':<{width + 1}} {value}\n")


class Progress:
    """`<what>: N…` on stderr while a listing pages, only when stderr is a terminal."""

    def __init__(self, what: str, stream: TextIO) -> None:
        self.what = what
        self.stream = stream
        self.shown = stream.isatty()
        self.count = 0

    def tick(self) -> None:
        self.count += 1
        if self.shown and self.count % 50 == 1:
            self.stream.write(f"\r{self.what}: {self.count}…")
            self.stream.flush()

    def done(self) -> None:
        if self.shown and self.count:
            self.stream.write(f"\r{self.what}: {self.count}, done\n")
            self.stream.flush()


async def collect(items: AsyncIterator[ItemT], progress: Progress) -> list[ItemT]:
    found: list[ItemT] = []
    try:
        async for item in items:
            found.append(item)
            progress.tick()
    finally:
        progress.done()
    return found


# Arguments.


def entity_type(text: str) -> lc.EntityType:
    aliases = {"inventory": "INVENTORY_ITEM", "item": "INVENTORY_ITEM", "sku": "INVENTORY_ITEM"}
    try:
        member = lc.EntityType.parse(aliases.get(text.strip().lower(), text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (or inventory)") from None
    if member is lc.EntityType.UNSPECIFIED:
        raise argparse.ArgumentTypeError("the entity type must be shipment or inventory_item")
    return member


def event_state(text: str) -> lc.EventState:
    try:
        return lc.EventState.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if number < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return number


def default_skip_key(entity: lc.EntityKey, sequence: int) -> str:
    """The same skip on the same MSI gets the same key, so running the command again replays
    the first answer instead of failing as NOT_A_GAP (the gap is gone by then)."""
    entity_id = entity.entity_id
    if _KEY_UNSAFE.search(entity_id):
        entity_id = hashlib.sha256(entity_id.encode()).hexdigest()[:32]
    return f"ops-skip:{entity.entity_type.name}:{entity_id}:{sequence}"


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--sequencer",
        metavar="HOST:PORT",
        help="the sequencer's gRPC address (default: $LOGISTICS_SEQUENCER_ADDR, else 127.0.0.1:50051)",
    )
    common.add_argument("--json", action="store_true", help="print proto3 JSON (camelCase) instead of a table")
    common.add_argument("--timeout", type=float, default=10.0, help="seconds per call (default 10)")

    parser = argparse.ArgumentParser(
        prog="python -m ops",
        description="Operate the logistics sequencer. Credentials and TLS come from LOGISTICS_* (docs/cli.md).",
        epilog="exit status: 0 ok, 1 error, 2 usage, 3 not found, 4 refused, 5 unavailable, "
        "6 not implemented by the server, 7 credentials missing or not allowed",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[common], help=text, description=text)

    def entity_args(p: argparse.ArgumentParser, required: bool = True) -> None:
        nargs = None if required else "?"
        p.add_argument("entity_type", type=entity_type, nargs=nargs, metavar="TYPE", help="shipment or inventory_item")
        p.add_argument("entity_id", nargs=nargs, metavar="ID", help="shipment id or SKU")

    command("gaps", "entities waiting for a missing MSI, oldest gap first (ListGaps)")
    entity_args(command("parked", "parked events, of one entity or all (ListParkedEvents)"), required=False)
    command("blocked", "BLOCKED events, oldest first (ListBlockedEvents)")
    entity_args(command("entity", "an entity's bookkeeping: watermark, parked, gap, blocked MSI (GetEntity)"))

    status = command("status", "one event's status, by transaction id or idempotency key (GetEventStatus)")
    status.add_argument("transaction_id", nargs="?", metavar="TRANSACTION_ID")
    status.add_argument("--key", help="the idempotency key it was submitted with (the caller's scope)")

    watch = command("watch", "status changes of a transaction (until terminal) or an entity (WatchEventStatus)")
    watch.add_argument("transaction_id", nargs="?", metavar="TRANSACTION_ID")
    watch.add_argument("--entity", nargs=2, metavar=("TYPE", "ID"), help="watch every event of one entity")
    watch.add_argument("--for", dest="duration", type=float, default=600.0, help="stop after this many seconds")

    for name, text in (
        ("skip", "give up on an entity's missing or BLOCKED MSI, releasing its successors (SkipSequence)"),
        ("retry", "send an entity's BLOCKED MSI to the ledger again (RetryBlockedEvent)"),
    ):
        p = command(name, text)
        entity_args(p)
        p.add_argument("sequence", type=positive, metavar="MSI")
        p.add_argument("--reason", required=True, help="why (kept in the audit record)")
        p.add_argument(
            "--key",
            help="idempotency key (default: "
            + ("derived from entity and MSI)" if name == "skip" else "a new one, printed)"),
        )

    hooks = command("webhooks", "webhook subscriptions and their deliveries (SPEC 14)")
    actions = hooks.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", parents=[common], help="subscriptions (ListWebhookSubscriptions)")
    create = actions.add_parser("create", parents=[common], help="a new subscription (CreateWebhookSubscription)")
    create.add_argument("url")
    create.add_argument(
        "--state",
        dest="states",
        type=event_state,
        action="append",
        default=[],
        help="repeatable; default: terminal states and BLOCKED",
    )
    create.add_argument("--entity-type", type=entity_type, help="only this entity type's events")
    create.add_argument("--description", default="")
    create.add_argument("--key", help="idempotency key (default: a new one, printed)")
    delete = actions.add_parser("delete", parents=[common], help="remove a subscription (DeleteWebhookSubscription)")
    delete.add_argument("subscription_id", metavar="SUBSCRIPTION_ID")
    deliveries = actions.add_parser(
        "deliveries", parents=[common], help="a subscription's deliveries (ListWebhookDeliveries)"
    )
    deliveries.add_argument("subscription_id", metavar="SUBSCRIPTION_ID")
    redeliver = actions.add_parser("redeliver", parents=[common], help="send a delivery again (RedeliverWebhook)")
    redeliver.add_argument("delivery_id", metavar="DELIVERY_ID")
    return parser


# Commands.


class Commands:
    def __init__(self, client: lc.SequencerClient, args: argparse.Namespace, out: TextIO, err: TextIO) -> None:
        self.client = client
        self.args = args
        self.out = out
        self.err = err
        self.timeout: float = args.timeout

    def entity(self) -> lc.EntityKey:
        return lc.EntityKey(self.args.entity_type, self.args.entity_id)

    async def gaps(self) -> int:
        gaps = await collect(
            self.client.list_gaps(page_size=PAGE_SIZE, timeout=self.timeout), Progress("gaps", self.err)
        )
        if self.args.json:
            emit_json({"gaps": [to_json(g) for g in gaps]}, self.out)
        else:
            table(
                ["ENTITY", "AWAITING", "PARKED", "FIRST SEEN (UTC)", "AGE", "ALERTING"],
                [
                    (
                        entity_text(g.entity),
                        g.awaiting_sequence,
                        g.parked_count,
                        when(g.first_seen_at, g.HasField("first_seen_at")),
                        age(g.age),
                        "yes" if g.alerting else "no",
                    )
                    for g in gaps
                ],
                self.out,
            )
        return EXIT_OK

    async def parked(self) -> int:
        if (self.args.entity_type is None) != (self.args.entity_id is None):
            raise Usage("give both TYPE and ID, or neither")
        entity = self.entity() if self.args.entity_id is not None else None
        events = await collect(
            self.client.list_parked_events(entity, page_size=PAGE_SIZE, timeout=self.timeout),
            Progress("parked", self.err),
        )
        if self.args.json:
            emit_json({"parkedEvents": [to_json(p) for p in events]}, self.out)
        else:
            table(
                ["ENTITY", "MSI", "PAYLOAD", "PARKED AT (UTC)", "TRANSACTION"],
                [
                    (
                        entity_text(p.event),
                        p.event.sequence,
                        p.event.WhichOneof("payload") or "-",
                        when(p.parked_at, p.HasField("parked_at")),
                        p.transaction_id,
                    )
                    for p in events
                ],
                self.out,
            )
        return EXIT_OK

    async def blocked(self) -> int:
        blocked = await collect(
            self.client.list_blocked_events(page_size=PAGE_SIZE, timeout=self.timeout), Progress("blocked", self.err)
        )
        if self.args.json:
            emit_json({"blockedEvents": [to_json(s.proto) for s in blocked]}, self.out)
        else:
            table(
                ["ENTITY", "MSI", "LEDGER CODE", "REASON", "ATTEMPTS", "BLOCKED AT (UTC)", "TRANSACTION"],
                [
                    (
                        entity_text(s.proto.entity),
                        s.sequence,
                        s.ledger_code or "-",
                        s.reason or "-",
                        s.forward_attempts,
                        when(s.proto.blocked_at, s.blocked_at is not None),
                        s.transaction_id,
                    )
                    for s in blocked
                ],
                self.out,
            )
        return EXIT_OK

    async def entity_(self) -> int:
        found = await self.client.get_entity(self.entity(), timeout=self.timeout)
        if self.args.json:
            emit_json(to_json(sequencer_pb2.GetEntityResponse(entity=found)), self.out)
            return EXIT_OK
        fields(
            [
                ("entity", entity_text(found.entity)),
                ("watermark", found.watermark),
                ("parked", found.parked_count),
                ("awaiting", found.awaiting_sequence or "-"),
                ("oldest gap age", age(found.oldest_gap_age) if found.awaiting_sequence else "-"),
                ("last outcome", state_text(found.last_outcome)),
                ("last outcome reason", found.last_outcome_reason or "-"),
                ("blocked MSI", found.blocked_sequence or "-"),
                ("blocked since (UTC)", when(found.blocked_since, found.HasField("blocked_since"))),
                ("blocked reason", found.blocked_reason or "-"),
                ("updated (UTC)", when(found.updated_at, found.HasField("updated_at"))),
            ],
            self.out,
        )
        return EXIT_OK

    def _status(self, status: lc.Status) -> None:
        if self.args.json:
            emit_json(to_json(sequencer_pb2.GetEventStatusResponse(status=status.proto)), self.out)
            return
        p = status.proto
        fields(
            [
                ("transaction", status.transaction_id),
                ("entity", entity_text(p.entity)),
                ("MSI", status.sequence),
                ("state", status.state.name),
                ("awaiting", status.awaiting_sequence or "-"),
                ("reason", status.reason or "-"),
                ("detail", status.reason_detail or "-"),
                ("entity version", status.entity_version),
                ("idempotency key", status.idempotency_key or "-"),
                ("correlation id", status.correlation_id or "-"),
                ("accepted (UTC)", when(p.accepted_at, status.accepted_at is not None)),
                ("processed (UTC)", when(p.processed_at, status.processed_at is not None)),
            ],
            self.out,
        )

    async def status(self) -> int:
        if bool(self.args.transaction_id) == bool(self.args.key):
            raise Usage("give a TRANSACTION_ID or --key KEY")
        found = await self.client.get_status(
            transaction_id=self.args.transaction_id, idempotency_key=self.args.key, timeout=self.timeout
        )
        self._status(found)
        return EXIT_OK

    async def watch(self) -> int:
        if bool(self.args.transaction_id) == bool(self.args.entity):
            raise Usage("give a TRANSACTION_ID or --entity TYPE ID")
        entity = None
        if self.args.entity:
            try:
                entity = lc.EntityKey(entity_type(self.args.entity[0]), self.args.entity[1])
            except argparse.ArgumentTypeError as exc:
                raise Usage(f"--entity: {exc}") from None
        stream = self.client.watch(transaction_id=self.args.transaction_id, entity=entity, timeout=self.args.duration)
        if not self.args.json:
            self.out.write("TIME (UTC)           ENTITY / MSI                    STATE       REASON\n")
        try:
            async for status in stream:
                if self.args.json:
                    line = to_json(sequencer_pb2.WatchEventStatusResponse(status=status.proto))
                    self.out.write(json.dumps(line) + "\n")
                else:
                    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
                    where = f"{entity_text(status.proto.entity)} #{status.sequence}"
                    self.out.write(
                        f"{now}  {where:<30}  {status.state.name:<10}  {status.reason or ''}".rstrip() + "\n"
                    )
                self.out.flush()
        except lc.DeadlineExceededError:
            if entity is not None:
                return EXIT_OK  # an entity watch ends at --for by design
            raise
        return EXIT_OK

    async def skip(self) -> int:
        entity = self.entity()
        key = self.args.key or default_skip_key(entity, self.args.sequence)
        reply = await self.client.skip_sequence(entity, self.args.sequence, self.args.reason, key, timeout=self.timeout)
        if self.args.json:
            emit_json(to_json(reply), self.out)
        else:
            where = f"{entity_text(reply.status.entity)} MSI {reply.status.sequence}"
            self.out.write(f"skipped {where} (key {key}); watermark now {reply.watermark}\n")
        return EXIT_OK

    async def retry(self) -> int:
        entity = self.entity()
        key = self.args.key or lc.new_idempotency_key()
        status = await self.client.retry_blocked_event(
            entity, self.args.sequence, self.args.reason, key, timeout=self.timeout
        )
        if self.args.json:
            emit_json(to_json(sequencer_pb2.RetryBlockedEventResponse(status=status.proto)), self.out)
        else:
            self.out.write(
                f"retrying {entity_text(status.proto.entity)} MSI {status.sequence}: {status.state.name} (key {key})\n"
            )
        return EXIT_OK

    async def webhooks(self) -> int:
        action: Callable[[], Any] = getattr(self, f"webhooks_{self.args.action}")
        result: int = await action()
        return result

    def _subscriptions(self, subscriptions: Sequence[sequencer_pb2.WebhookSubscription]) -> None:
        table(
            ["ID", "URL", "STATE", "STATES", "ENTITY TYPE", "CREATED (UTC)", "DESCRIPTION"],
            [
                (
                    s.id,
                    s.url,
                    sequencer_pb2.WebhookSubscriptionState.Name(s.state).removeprefix("WEBHOOK_SUBSCRIPTION_STATE_"),
                    ",".join(state_text(x) for x in s.states) or "-",
                    lc.EntityType(s.entity_type).name.lower() if s.entity_type else "any",
                    when(s.created_at, s.HasField("created_at")),
                    s.description or "-",
                )
                for s in subscriptions
            ],
            self.out,
        )

    async def webhooks_list(self) -> int:
        found = await collect(
            self.client.list_webhook_subscriptions(page_size=PAGE_SIZE, timeout=self.timeout),
            Progress("subscriptions", self.err),
        )
        if self.args.json:
            emit_json({"subscriptions": [to_json(s) for s in found]}, self.out)
        else:
            self._subscriptions(found)
        return EXIT_OK

    async def webhooks_create(self) -> int:
        key = self.args.key or lc.new_idempotency_key()
        created = await self.client.create_webhook_subscription(
            self.args.url,
            states=[int(s) for s in self.args.states],
            entity_type=int(self.args.entity_type or 0),
            description=self.args.description,
            idempotency_key=key,
            timeout=self.timeout,
        )
        if self.args.json:
            emit_json(to_json(sequencer_pb2.CreateWebhookSubscriptionResponse(subscription=created)), self.out)
        else:
            self._subscriptions([created])
            self.out.write(f"secret (shown once): {created.secret}\nkey: {key}\n")
        return EXIT_OK

    async def webhooks_delete(self) -> int:
        await self.client.delete_webhook_subscription(self.args.subscription_id, timeout=self.timeout)
        if self.args.json:
            emit_json({}, self.out)
        else:
            self.out.write(f"deleted {self.args.subscription_id}\n")
        return EXIT_OK

    def _deliveries(self, deliveries: Sequence[sequencer_pb2.WebhookDelivery]) -> None:
        table(
            ["ID", "ENTITY", "MSI", "TYPE", "STATE", "ATTEMPTS", "LAST HTTP", "NEXT ATTEMPT (UTC)", "LAST ERROR"],
            [
                (
                    d.id,
                    entity_text(d.entity),
                    d.sequence,
                    d.event_type,
                    sequencer_pb2.WebhookDeliveryState.Name(d.state).removeprefix("WEBHOOK_DELIVERY_STATE_"),
                    d.attempts,
                    d.last_http_status or "-",
                    when(d.next_attempt_at, d.HasField("next_attempt_at")),
                    d.last_error or "-",
                )
                for d in deliveries
            ],
            self.out,
        )

    async def webhooks_deliveries(self) -> int:
        found = await collect(
            self.client.list_webhook_deliveries(self.args.subscription_id, page_size=PAGE_SIZE, timeout=self.timeout),
            Progress("deliveries", self.err),
        )
        if self.args.json:
            emit_json({"deliveries": [to_json(d) for d in found]}, self.out)
        else:
            self._deliveries(found)
        return EXIT_OK

    async def webhooks_redeliver(self) -> int:
        delivery = await self.client.redeliver_webhook(self.args.delivery_id, timeout=self.timeout)
        if self.args.json:
            emit_json(to_json(sequencer_pb2.RedeliverWebhookResponse(delivery=delivery)), self.out)
        else:
            self._deliveries([delivery])
        return EXIT_OK


RPCS = {
    "gaps": "ListGaps",
    "parked": "ListParkedEvents",
    "blocked": "ListBlockedEvents",
    "entity": "GetEntity",
    "status": "GetEventStatus",
    "watch": "WatchEventStatus",
    "skip": "SkipSequence",
    "retry": "RetryBlockedEvent",
    "webhooks list": "ListWebhookSubscriptions",
    "webhooks create": "CreateWebhookSubscription",
    "webhooks delete": "DeleteWebhookSubscription",
    "webhooks deliveries": "ListWebhookDeliveries",
    "webhooks redeliver": "RedeliverWebhook",
}


def describe_failure(name: str, address: str, exc: lc.LogisticsError) -> str:
    """The one line a failed command prints: what, where, the code and reason, the message."""
    rpc = RPCS.get(name, name)
    if exc.code == grpc.StatusCode.UNIMPLEMENTED:
        return f"{name}: the sequencer at {address} does not implement {rpc} (UNIMPLEMENTED): it is older than this CLI"
    if exc.code == grpc.StatusCode.UNAVAILABLE and not exc.reason:
        return f"{name}: cannot reach the sequencer at {address} (UNAVAILABLE): {exc.details}"
    reason = f" {exc.reason}" if exc.reason else ""
    extra = "".join(f" {k}={v}" for k, v in sorted(exc.metadata.items()))
    return f"{name}: {rpc} failed: {exc.code.name}{reason}: {exc.details}{extra}"


async def run(args: argparse.Namespace, config: lc.ClientConfig, out: TextIO, err: TextIO) -> int:
    name = args.command + (f" {args.action}" if args.command == "webhooks" else "")
    async with lc.SequencerClient.from_env(config) as client:
        commands = Commands(client, args, out, err)
        handler = getattr(commands, "entity_" if args.command == "entity" else args.command)
        try:
            result: int = await handler()
        except Usage as exc:
            err.write(f"python -m ops {name}: {exc}\n")
            return EXIT_USAGE
        except lc.LogisticsError as exc:
            err.write(describe_failure(name, config.sequencer, exc) + "\n")
            return EXIT_STATUSES.get(exc.code, EXIT_ERROR)
        return result


def main(argv: Sequence[str], out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Runs one command; returns its exit status (argparse exits 2 itself on a bad line)."""
    args = build_parser().parse_args(list(argv))
    try:
        config = lc.ClientConfig.from_env().replace(sequencer=args.sequencer)
    except lc.ClientConfigError as exc:
        err.write(f"python -m ops: {exc}\n")
        return EXIT_USAGE
    try:
        return asyncio.run(run(args, config, out, err))
    except lc.ClientConfigError as exc:
        err.write(f"python -m ops: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
