"""Observability: structured logs (`logs`) and Prometheus instruments (`metrics`).

Sits outside the app -> shell -> core layers so any module may import it; it imports nothing
from those layers except the closed label sets in `core.model`.
"""
