"""The transport-neutral core: domain types, the failure vocabulary, validation and the request path."""
