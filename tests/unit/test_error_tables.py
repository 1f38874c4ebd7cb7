"""Every error class a service can raise has a status code in the table its interceptor really
uses (built as the server builds it), found by the same MRO lookup `status_for` does.

The classes come from the service's errors module and common.errors, not from a list here: a
new error class without a table entry (which would answer INTERNAL) fails this test."""

from __future__ import annotations

from types import ModuleType

import grpc
import pytest
from google.rpc import error_details_pb2

import common.errors
from common.auth import Authenticator
from common.errors import DomainError
from common.interceptors import ServiceInterceptor, status_for
from ledger import errors as ledger_errors
from ledger import interceptors as ledger_interceptors
from sequencer import errors as sequencer_errors
from sequencer import interceptors as sequencer_interceptors

SERVICES: dict[str, tuple[ModuleType, ModuleType]] = {
    "sequencer": (sequencer_errors, sequencer_interceptors),
    "ledger": (ledger_errors, ledger_interceptors),
}

# Families whose code follows from the base class, whatever the service.
FAMILIES: dict[type[DomainError], grpc.StatusCode] = {
    common.errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    common.errors.NotFound: grpc.StatusCode.NOT_FOUND,
    common.errors.Retryable: grpc.StatusCode.UNAVAILABLE,
    common.errors.DeadlineReached: grpc.StatusCode.DEADLINE_EXCEEDED,
    common.errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    common.errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}

# Errors outside the families whose code the contract names (README.md, error table): a class
# missing here still has to map to something other than INTERNAL, UNKNOWN or OK.
NAMED: dict[str, grpc.StatusCode] = {
    "SequenceConflict": grpc.StatusCode.FAILED_PRECONDITION,
    "OutOfOrder": grpc.StatusCode.FAILED_PRECONDITION,
    "IdempotencyKeyReused": grpc.StatusCode.FAILED_PRECONDITION,
    "NotAGap": grpc.StatusCode.FAILED_PRECONDITION,
    "ParkedLimitReached": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "TooManyWatchers": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "RequestTooLarge": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "CallerOverloaded": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "BacklogFull": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "Overloaded": grpc.StatusCode.RESOURCE_EXHAUSTED,
}

NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.OK}


def error_classes(module: ModuleType) -> list[type[DomainError]]:
    """Every DomainError subclass the module defines or exports, and common.errors', except
    bare bases (DomainError, SequencerError, LedgerError: no reason of their own, only
    subclassed), which nothing raises."""
    found = {
        value
        for source in (module, common.errors)
        for value in vars(source).values()
        if isinstance(value, type) and issubclass(value, DomainError)
    }

    def bare_base(cls: type[DomainError]) -> bool:
        if cls is DomainError:
            return True
        return "reason" not in vars(cls) and any(other is not cls and issubclass(other, cls) for other in found)

    return sorted((cls for cls in found if not bare_base(cls)), key=lambda cls: cls.__name__)


def interceptor(service: str) -> ServiceInterceptor:
    """The interceptor exactly as the service's server builds it (server.py: build_interceptor
    over an authenticator and the message limit)."""
    _, module = SERVICES[service]
    built = module.build_interceptor(Authenticator.from_file(""), max_message_bytes=1024 * 1024)
    assert isinstance(built, ServiceInterceptor)
    return built


def intended(cls: type[DomainError]) -> grpc.StatusCode | None:
    if cls.__name__ in NAMED:
        return NAMED[cls.__name__]
    # The most specific family along the MRO.
    return next((FAMILIES[base] for base in cls.__mro__ if base in FAMILIES), None)


CASES = [(service, cls) for service, (errors, _) in SERVICES.items() for cls in error_classes(errors)]


@pytest.mark.parametrize(("service", "cls"), CASES, ids=[f"{s}-{c.__name__}" for s, c in CASES])
def test_every_error_class_maps_to_its_code(service: str, cls: type[DomainError]) -> None:
    built = interceptor(service)
    domain = SERVICES[service][1].DOMAIN
    error = cls("an example")
    status = status_for(error, built.table, built.domain)
    code = next(c for c in grpc.StatusCode if c.value[0] == status.code)
    assert code not in NEVER, f"{service}: {cls.__name__} has no entry along its MRO in the table (answers {code.name})"
    expected = intended(cls)
    if expected is not None:
        assert code == expected, f"{service}: {cls.__name__} answers {code.name}, not {expected.name}"
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert cls.reason != "UNSPECIFIED", f"{cls.__name__} has no ErrorInfo reason of its own"
    assert (info.reason, info.domain) == (cls.reason, domain)


@pytest.mark.parametrize("service", list(SERVICES))
def test_the_classes_found_include_every_family_and_the_service_own(service: str) -> None:
    """The discovery above is not vacuous: it sees the common families and the service's own."""
    errors, _ = SERVICES[service]
    found = set(error_classes(errors))
    assert set(FAMILIES) <= found
    own = [cls for cls in found if cls.__module__ == errors.__name__]
    assert len(own) >= 5
    assert DomainError not in found


def test_an_outage_is_unavailable_transient_on_both_services() -> None:
    """Retryable is what common.db.translate makes of every transient driver error."""
    for service in SERVICES:
        built = interceptor(service)
        status = status_for(common.errors.Retryable("the database is unavailable"), built.table, built.domain)
        assert status.code == grpc.StatusCode.UNAVAILABLE.value[0]


def test_a_class_without_an_entry_would_answer_internal() -> None:
    """The lookup the test relies on does fail for an unlisted class (the guard is real)."""

    class Unlisted(DomainError):
        reason = "UNLISTED"

    built = interceptor("ledger")
    assert status_for(Unlisted("x"), built.table, built.domain).code == grpc.StatusCode.INTERNAL.value[0]
