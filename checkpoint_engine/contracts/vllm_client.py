"""Typed HTTP client of the vLLM sidecar (see server.py for the endpoints)."""

from __future__ import annotations

import requests

from checkpoint_engine.contracts.vllm_protocol import (
    GenerateBody,
    GenerateResponse,
    GenerationRequest,
    Health,
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

    def _post(self, path: str, body: object, timeout: float | None = None) -> dict:
        r = self._session.post(
            self.base_url + path, json=body.model_dump(by_alias=True), timeout=timeout or self.timeout
        )
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

    def close(self) -> None:
        self._session.close()
