"""Pure decisions: no asyncio, no I/O, no clock reads. "now" is always an argument."""
