"""What every route needs from the app: the store, the notifier, the clock and the settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from scaleq.notify import Notifier
from scaleq.server.cadence import Cadence
from scaleq.server.settings import ServerSettings
from scaleq.store.base import Store


@dataclass
class Ctx:
    store: Store
    notifier: Notifier
    settings: ServerSettings
    request: Request

    def now(self) -> float:
        return self.request.app.state.clock()

    @property
    def cadence(self) -> Cadence:
        """The beat and lease this server grants now (:mod:`scaleq.server.cadence`)."""
        cadence: Cadence = self.request.app.state.cadence
        return cadence


def context(request: Request) -> Ctx:
    s = request.app.state
    return Ctx(s.store, s.notifier, s.settings, request)


async def _ctx(request: Request) -> Ctx:  # async: FastAPI runs a plain def dependency on a thread, per request
    return context(request)


C = Annotated[Ctx, Depends(_ctx)]
