"""Durable state: lineages, attempts, the append-only event log, holds, leadership."""
