"""Typed HTTP client of the vLLM sidecar (see server.py for the endpoints)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import requests

from checkpoint_engine.contracts.message import Message
from checkpoint_engine.contracts.vllm_protocol import (
    GenerateBody,
    GenerateResponse,
    GenerationRequest,
    Health,
    SleepBody,
    SleepResponse,
    UpdateWeightsBody,
    UpdateWeightsResponse,
)


class SidecarError(RuntimeError):
    """The sidecar answered with an error; `status` is the HTTP status (500 and up: vLLM itself failed)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class VllmClient:
    def __init__(self, base_url: str, timeout: float = 600.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._session = requests.Session()

    def _post(self, path: str, body: Message | None, timeout: float | None = None) -> dict:
        payload = body.model_dump(by_alias=True) if body is not None else {}
        r = self._session.post(self.base_url + path, json=payload, timeout=timeout or self.timeout)
        if r.status_code != 200:
            detail = r.json().get("detail", r.text) if r.headers.get("content-type") == "application/json" else r.text
            raise SidecarError(f"POST {path} -> {r.status_code}: {detail}", r.status_code)
        return r.json()

    def health(self, timeout: float = 2.0) -> Health:
        r = self._session.get(self.base_url + "/health", timeout=timeout)
        r.raise_for_status()
        return Health.model_validate(r.json())

    def update_weights(self, manifest: dict) -> UpdateWeightsResponse:
        return UpdateWeightsResponse.model_validate(self._post("/weights/update", UpdateWeightsBody(manifest=manifest)))

    def generate(self, requests_: list[GenerationRequest]) -> GenerateResponse:
        return GenerateResponse.model_validate(self._post("/generate", GenerateBody(requests=requests_)))

    def sleep(self, level: int) -> SleepResponse:
        return SleepResponse.model_validate(self._post("/sleep", SleepBody(level=level)))

    def wake_up(self) -> SleepResponse:
        return SleepResponse.model_validate(self._post("/wake_up", None))

    def close(self) -> None:
        self._session.close()


class VllmLostError(ConnectionError):
    """A node's vLLM did not answer (refused, broke the connection, or failed inside): `node` names it."""

    def __init__(self, node: str, cause: Exception) -> None:
        super().__init__(f"vLLM of {node}: {cause}")
        self.node, self.cause = node, cause


class SpreadVllmClient:
    """The vLLMs of every node as one: a generate call's requests go out in contiguous, near-equal shares,
    one per node, all at once, and come back in request order. Each request carries its own seed, so the
    results do not depend on how they were spread. `served` counts the requests each node answered."""

    def __init__(self, clients: dict[str, VllmClient]) -> None:
        if not clients:
            raise ValueError("no vLLM to roll out on")
        self.clients = dict(sorted(clients.items()))
        self.served = dict.fromkeys(self.clients, 0)

    def generate(self, requests_: list[GenerationRequest]) -> GenerateResponse:
        nodes = list(self.clients)
        size, extra = divmod(len(requests_), len(nodes))
        shares, start = {}, 0
        for i, node in enumerate(nodes):
            end = start + size + (i < extra)
            if end > start:
                shares[node] = requests_[start:end]
            start = end
        with ThreadPoolExecutor(len(shares)) as pool:
            futures = {n: pool.submit(self.clients[n].generate, share) for n, share in shares.items()}
            answers = {}
            for node, future in futures.items():
                try:
                    answers[node] = future.result()
                except (OSError, SidecarError) as e:
                    if isinstance(e, SidecarError) and e.status < 500:
                        raise  # the request was refused: the same on any node
                    raise VllmLostError(node, e) from e
        for node, share in shares.items():
            self.served[node] += len(share)
        results = [r for node in shares for r in answers[node].results]
        return GenerateResponse(results=results, seconds=max(a.seconds for a in answers.values()))

    def close(self) -> None:
        for client in self.clients.values():
            client.close()
