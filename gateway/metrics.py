"""Prometheus text exposition of ``engine.stats()`` and the gateway's own counters."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

__all__ = ["CONTENT_TYPE", "render_metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"



def _is_counter(name: str) -> bool:
    """EngineStats' fields that only grow: ``*_total`` and ``requests_*``; the rest are gauges."""
    return name.endswith("_total") or name.startswith("requests_")


def _metric_lines(name: str, kind: str, help_text: str, samples: Mapping[str, float]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples.items():
        lines.append(f"{name}{labels} {value:g}" if isinstance(value, float) else f"{name}{labels} {value}")
    return lines


def _labels(**labels: str) -> str:
    def escape(v: str) -> str:
        return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels.items()) + "}"


def render_metrics(stats: Any, model_id: str, in_flight: int, rejected: Mapping[str, int]) -> str:
    """``stats`` is an EngineStats (a dataclass); each numeric field becomes ``ksdk_<field>``."""
    label = _labels(model=model_id)
    lines: list[str] = []
    for field in dataclasses.fields(stats):
        value = getattr(stats, field.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if _is_counter(field.name):
            name = field.name if field.name.endswith("_total") else f"{field.name}_total"
            lines += _metric_lines(f"ksdk_{name}", "counter", f"engine stat {field.name}", {label: value})
        else:
            lines += _metric_lines(f"ksdk_{field.name}", "gauge", f"engine stat {field.name}", {label: value})
    lines += _metric_lines("ksdk_gateway_requests_in_flight", "gauge",
                           "generation requests being answered", {label: in_flight})
    lines += _metric_lines("ksdk_gateway_requests_rejected_total", "counter",
                           "requests refused before reaching the engine, by reason",
                           {_labels(model=model_id, reason=r): n for r, n in sorted(rejected.items())})
    return "\n".join(lines) + "\n"
