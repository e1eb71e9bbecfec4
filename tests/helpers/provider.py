"""The sandbox provider's test endpoints: what it really charged, and faults on demand."""

from __future__ import annotations

from typing import Any

import httpx


class SandboxProvider:
    def __init__(self, base_url: str, api_key: str) -> None:
        self.base_url = base_url
        self.api_key = api_key
        self._headers = {"Authorization": f"Bearer {api_key}"}

    async def stats(self) -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=self.base_url, headers=self._headers) as http:
            response = await http.get("/sandbox/stats")
            response.raise_for_status()
            stats: dict[str, Any] = response.json()
            return stats

    async def set_faults(self, **faults: float) -> None:
        async with httpx.AsyncClient(base_url=self.base_url, headers=self._headers) as http:
            (await http.put("/sandbox/faults", json=faults)).raise_for_status()

    async def clear_faults(self) -> None:
        async with httpx.AsyncClient(base_url=self.base_url, headers=self._headers) as http:
            (await http.delete("/sandbox/faults")).raise_for_status()
