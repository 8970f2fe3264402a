"""The worker's async gRPC client for the served models, ``recommend``, ``fold`` and
``encode_items``, with timeouts and retries. Inputs go as ``models.inputs.ModelInputs`` both
ways."""

from __future__ import annotations

import asyncio
import logging
import random

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE
from tritonclient.utils import InferenceServerException

from persrec.models.inputs import ModelInputs

log = logging.getLogger(__name__)

# gRPC status codes worth retrying: the server is down, restarting, overloaded or slow.
RETRYABLE = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "INTERNAL", "UNKNOWN")


# tritonclient's message size limits, plus a cap on gRPC's own reconnect backoff: left at its
# default (growing to 120 s), a channel whose server was away for 30 s may wait ~25 s more after
# the server is back before it tries to connect again (tests/reliability/test_outages.py).
CHANNEL_ARGS = [
    ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
    ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class TritonUnavailable(RuntimeError):
    """Triton did not answer after the allowed attempts (an outage)."""


class TritonRejected(RuntimeError):
    """Triton answered with an error about this request: the model raised on its inputs
    (``INTERNAL: Failed to process the request(s)``), or they were invalid. Retrying the same
    inputs gives the same answer; see ``stream.poison``."""


def _rejected(exc: InferenceServerException) -> bool:
    status, text = (exc.status() or "").upper(), str(exc)
    return "INVALID_ARG" in status or ("INTERNAL" in status and "Failed to process the request" in text)


def _retryable(exc: InferenceServerException) -> bool:
    status = (exc.status() or "").upper()
    return any(code in status for code in RETRYABLE) or "unavailable" in str(exc).lower()


class TritonModels:
    """``recommend`` / ``fold`` calls on numpy batches (``ModelInputs``).

    Each call has a deadline (``timeout_s``); retryable failures back off exponentially (capped at
    ``max_backoff_s``) for at most ``max_attempts`` tries (None = until it succeeds: the worker
    waits out a Triton restart instead of dropping events). ``fold_model``: the repository's
    name of the fold model (``Manifest.fold_model``).
    """

    def __init__(self, url: str, *, timeout_s: float = 5.0, max_attempts: int | None = 3,
                 max_backoff_s: float = 2.0, version: str = "", fold_model: str = "fold") -> None:
        self.url = url
        # The Triton model version to call ("" = whatever the server serves). A worker pins the
        # version of its manifest, so that once a new version is loaded it is never answered by
        # a model other than the one its memories and messages name.
        self.version = version
        self.fold_model = fold_model
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.max_backoff_s = max_backoff_s
        self._client = grpcclient.InferenceServerClient(url, channel_args=CHANNEL_ARGS)

    async def close(self) -> None:
        await self._client.close()

    async def ready(self, model: str = "recommend", version: str | None = None) -> bool:
        """The pinned version (or ``version``) of ``model`` is loaded (another version being
        served is not ready: this client would get no answer)."""
        try:
            return bool(await self._client.is_model_ready(model, model_version=self.version if version is None else version,
                                                         client_timeout=self.timeout_s))
        except Exception:  # noqa: BLE001 - any failure means "not ready"
            return False

    async def _infer(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        tensors = []
        for name, arr in inputs.items():
            dtype = {np.dtype(np.int64): "INT64", np.dtype(np.float32): "FP32", np.dtype(bool): "BOOL",
                     np.dtype(object): "BYTES"}[arr.dtype]
            t = grpcclient.InferInput(name, list(arr.shape), dtype)
            t.set_data_from_numpy(np.ascontiguousarray(arr))
            tensors.append(t)
        requested = [grpcclient.InferRequestedOutput(o) for o in outputs]
        attempt = 0
        while True:
            attempt += 1
            try:
                result = await self._client.infer(model, tensors, model_version=self.version, outputs=requested,
                                                  client_timeout=self.timeout_s)
                return {o: result.as_numpy(o) for o in outputs}
            except InferenceServerException as exc:
                if _rejected(exc):
                    raise TritonRejected(f"{model} at {self.url}: {exc}") from exc
                if not _retryable(exc) or (self.max_attempts is not None and attempt >= self.max_attempts):
                    raise TritonUnavailable(f"{model} at {self.url}: {exc}") from exc
                delay = min(self.max_backoff_s, 0.05 * 2 ** min(attempt, 10)) * (0.5 + random.random() / 2)
                log.warning("triton %s failed (%s); retry %d in %.2fs", model, exc.status(), attempt, delay)
                await asyncio.sleep(delay)

    async def recommend(self, x: ModelInputs) -> tuple[np.ndarray, np.ndarray]:
        """-> TOP_IDS ``[B, k]`` int64 (dense ids), TOP_SCORES ``[B, k]`` float32."""
        out = await self._infer("recommend", tensors(x, memory=x.memory is not None, request=x.request_ts is not None),
                                ["TOP_IDS", "TOP_SCORES"])
        return out["TOP_IDS"], out["TOP_SCORES"]

    async def fold(self, x: ModelInputs) -> np.ndarray:
        """-> NEW_MEMORY ``[B, L, 2, M, H, Dh]`` float32."""
        out = await self._infer(self.fold_model, tensors(x, memory=True, request=False), ["NEW_MEMORY"])
        return out["NEW_MEMORY"]

    async def encode_items(self, texts: list[str]) -> np.ndarray:
        """-> EMBEDDING ``[n, E]`` float32, one row per text."""
        arr = np.array([t.encode("utf-8") for t in texts], dtype=object).reshape(-1, 1)
        return (await self._infer("encode_items", {"TEXT": arr}, ["EMBEDDING"]))["EMBEDDING"]


def tensors(x: ModelInputs, *, memory: bool, request: bool) -> dict[str, np.ndarray]:
    """The Triton inputs of ``x`` (names as in the exported configs, ``serving.export``)."""
    out = {"ITEMS": x.items.astype(np.int64), "TIMESTAMPS": x.timestamps.astype(np.int64),
           "LENGTHS": x.lengths.reshape(-1, 1).astype(np.int64)}
    if memory:
        out |= {"MEMORY": x.memory.astype(np.float32), "HAS_MEMORY": x.has_memory.reshape(-1, 1).astype(bool)}
    if request:
        out["REQUEST_TS"] = x.request_ts.reshape(-1, 1).astype(np.int64)
    if x.catalogue is not None:
        out["CATALOGUE"] = x.catalogue.astype(np.int64)
    return out
