"""The HTTP/JSON API of SPEC 13: routes from the protos' google.api.http annotations, transcoded
to the sequencer's own gRPC API (docs/http.md)."""
