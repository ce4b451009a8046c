"""Deletion requests and their append-only ledger (``DIR/ledger.jsonl``).

A request names what to forget at one of three grains — a whole ``client``, some ``samples`` of a
client (local indices), or a whole ``class`` across clients — and lives through
``pending → applied | failed``, or is ``refused`` at once (unknown client, already deleted, a grain
no method handles yet). Every event is one JSON line, flushed and fsynced before the run goes on,
so a crash loses no decision that was acted upon.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedunlearn.errors import ConfigError

GRAINS = ("client", "samples", "class")
# The grains some unlearning method can act on today; the others are recorded and refused.
SUPPORTED_GRAINS = ("client",)


@dataclass(frozen=True)
class DeletionRequest:
    grain: str
    clients: tuple[int, ...] = ()
    sample_indices: tuple[int, ...] = ()  # local indices, for grain "samples" (one client)
    label: int | None = None  # for grain "class"
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def describe(self) -> dict[str, Any]:
        described: dict[str, Any] = {"grain": self.grain}
        if self.clients:
            described["clients"] = list(self.clients)
        if self.sample_indices:
            described["sample_indices"] = list(self.sample_indices)
        if self.label is not None:
            described["class"] = self.label
        return described


def requests_from_config(forget_clients: str) -> list[DeletionRequest]:
    """``forget-clients = "0,3"``: one client-grain request per id, in order."""
    requests = []
    for item in (part.strip() for part in forget_clients.split(",")):
        if not item:
            continue
        try:
            client = int(item)
        except ValueError:
            raise ConfigError("forget-clients", forget_clients, "comma-separated partition ids, e.g. 0,3") from None
        requests.append(DeletionRequest(grain="client", clients=(client,)))
    return requests


def _request_from_mapping(entry: Mapping[str, Any], source: str) -> DeletionRequest:
    grain = entry.get("grain", "client")
    if grain not in GRAINS:
        raise ConfigError(f"{source}: grain", grain, GRAINS)
    if grain == "class":
        if "class" not in entry:
            raise ConfigError(f"{source}: class", None, "a class label (integer)")
        return DeletionRequest(grain="class", label=int(entry["class"]))
    clients = entry.get("clients", [entry["client"]] if "client" in entry else [])
    if not clients:
        raise ConfigError(f"{source}: client", None, "a partition id ('client') or a list ('clients')")
    if grain == "samples":
        indices = entry.get("indices", [])
        if len(clients) != 1 or not indices:
            raise ConfigError(f"{source}: indices", indices, "one 'client' and a non-empty list of local 'indices'")
        return DeletionRequest(grain="samples", clients=(int(clients[0]),), sample_indices=tuple(map(int, indices)))
    return DeletionRequest(grain="client", clients=tuple(int(client) for client in clients))


def requests_from_file(path: str | Path) -> list[DeletionRequest]:
    """A JSON file: a list of requests, or ``{"requests": [...]}``; each ``{"grain": "client",
    "client": 0}``, ``{"grain": "samples", "client": 2, "indices": [0, 5]}`` or ``{"grain": "class", "class": 3}``."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError("deletion-requests", str(path), "an existing JSON file", reason="file not found") from None
    except json.JSONDecodeError as error:
        raise ConfigError("deletion-requests", str(path), "a JSON file", reason=str(error)) from None
    entries = document.get("requests", []) if isinstance(document, dict) else document
    if not isinstance(entries, list):
        raise ConfigError("deletion-requests", str(path), "a list of requests or {'requests': [...]}")
    return [_request_from_mapping(entry, f"deletion-requests[{number}]") for number, entry in enumerate(entries)]


class Ledger:
    """Append-only JSON-lines log of request events."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, request: DeletionRequest, status: str, **details: Any) -> dict[str, Any]:
        event = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "request_id": request.request_id,
            "status": status,
            **request.describe(),
            **details,
        }
        line = json.dumps(event, sort_keys=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        return event

    def events(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def deleted_clients(self) -> set[int]:
        """Clients whose whole data an earlier request already removed (by any method)."""
        deleted: set[int] = set()
        for event in self.events():
            if event["status"] == "applied" and event.get("grain") == "client":
                deleted.update(event.get("clients", []))
        return deleted


def screen_requests(
    requests: Iterable[DeletionRequest], known_clients: Iterable[int], ledger: Ledger,
    refused: list[tuple[DeletionRequest, str]] | None = None,
) -> list[DeletionRequest]:
    """Log every request; refuse the ones that cannot be acted on (appended with the reason to
    ``refused`` when given); return the rest (pending)."""
    known = set(known_clients)
    already_deleted = ledger.deleted_clients()
    accepted: list[DeletionRequest] = []
    for request in requests:
        reason = None
        unknown = [client for client in request.clients if client not in known]
        repeated = [client for client in request.clients if client in already_deleted]
        if request.grain not in SUPPORTED_GRAINS:
            reason = f"grain '{request.grain}' has no unlearning method yet (supported: {', '.join(SUPPORTED_GRAINS)})"
        elif unknown:
            reason = f"unknown client(s) {unknown}; known partition ids: 0..{max(known)}"
        elif repeated:
            reason = f"client(s) {repeated} already deleted by an earlier request"
        if reason:
            ledger.append(request, "refused", reason=reason)
            if refused is not None:
                refused.append((request, reason))
            continue
        ledger.append(request, "pending")
        already_deleted.update(request.clients)
        accepted.append(request)
    return accepted
