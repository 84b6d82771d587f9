"""What is registered, in a form people and docs can read."""

from __future__ import annotations

from typing import Any

from kvpress_like.plugins import get_registry


def list_parts() -> dict[str, Any]:
    """Every registered part and method with its config fields, defaults and owning plugin."""
    registry = get_registry()
    parts = {
        kind: [
            {
                "name": name,
                "summary": cls.summary,
                "plugin": registry.owners[(kind, name)],
                "options": {
                    field: {"default": info.default, "description": info.description or ""}
                    for field, info in cls.Config.model_fields.items()
                },
            }
            for name, cls in sorted(table.items())
        ]
        for kind, table in registry.parts.items()
    }
    parts["method"] = [
        {"plugin": registry.owners[("method", name)], **spec.model_dump()}
        for name, spec in sorted(registry.methods.items())
    ]
    return parts


def format_catalog(catalog: dict[str, Any]) -> str:
    """Plain-text rendering of :func:`list_parts` for the ``list`` command."""
    lines = ["Methods:"]
    for method in catalog["method"]:
        lines.append(f"  {method['name']}: {method['summary']}")
        if method["paper"]:
            lines.append(f"      paper: {method['paper']}")
        for kind in ("window", "scorer", "allocator", "selector"):
            choice = method[kind]
            options = ", ".join(f"{k}={v!r}" for k, v in choice["options"].items())
            lines.append(f"      {kind}: {choice['name']}" + (f" ({options})" if options else ""))
    titles = {"window": "Window builders", "scorer": "Scorers", "allocator": "Allocators", "selector": "Selectors"}
    for kind, title in titles.items():
        lines.append(f"{title}:")
        for part in catalog[kind]:
            lines.append(f"  {part['name']}: {part['summary']}  [plugin {part['plugin']}]")
            for field, info in part["options"].items():
                lines.append(f"      {field} = {info['default']!r}  {info['description']}")
    return "\n".join(lines)
