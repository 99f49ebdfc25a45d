"""The I/O edge: gateway, poller, executor, handoffs, store, HTTP. Side effects live here."""
