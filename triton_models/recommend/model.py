"""Triton python-backend model ``recommend``: memory + recent window -> top-k items.

Inputs (per row): MEMORY fp32 [L,2,M,H,Dh], HAS_MEMORY bool [1], ITEMS int64 [W],
TIMESTAMPS int64 [W], LENGTHS int64 [1], and for a request-time model REQUEST_TS int64 [1]
(unix seconds of the event the recommendation answers), and for a model that reads items by
their text CATALOGUE int64 [2] (the worker's catalogue revision and highest item id:
``serving.catalogue``). Outputs: TOP_IDS int64 [k], TOP_SCORES fp32 [k].
Requests that Triton's dynamic batcher hands over together run as one batch.

A model with memory tokens keeps its users' recent-window keys/values between events
(``window_cache_mb``, ``serving.window_cache``); with ``window_cache_metrics`` (off by default,
``serving.export`` says why) Triton's metrics endpoint reports it as ``persrec_window_cache_*``.
"""

import numpy as np
import triton_python_backend_utils as pb_utils

from persrec.serving.inference import catalogue_from_triton_args, runner_from_triton_args
from persrec.serving.triton_batch import model_inputs, split_rows
from persrec.serving.window_cache import METRICS


class TritonPythonModel:
    def initialize(self, args):
        self.runner, params = runner_from_triton_args(args)
        self.top_k = int(params["top_k"])
        self.exclude_seen = params.get("exclude_seen", "true") == "true"
        self.has_memory = self.runner.cfg.has_memory
        self.request_time = self.runner.cfg.request_time
        self.catalogue = catalogue_from_triton_args(self.runner, params)
        metrics = params.get("window_cache_metrics", "false") == "true"  # serving.export says why off
        self.cache_metrics = CacheMetrics(self.runner.window_cache if metrics else None, args["model_version"])

    def execute(self, requests):
        names = (["ITEMS", "TIMESTAMPS", "LENGTHS"] + (["MEMORY", "HAS_MEMORY"] if self.has_memory else [])
                 + (["REQUEST_TS"] if self.request_time else []) + (["CATALOGUE"] if self.catalogue else []))
        x, sizes = model_inputs([{n: pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in names} for r in requests])
        if self.catalogue and (error := self.catalogue.unavailable(x)):
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(error)) for _ in requests]
        ids, scores = self.runner.recommend(x, self.top_k, self.exclude_seen)
        self.cache_metrics.publish()
        return [
            pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("TOP_IDS", i), pb_utils.Tensor("TOP_SCORES", s.astype(np.float32)),
            ])
            for i, s in zip(split_rows(ids, sizes), split_rows(scores, sizes))
        ]


class CacheMetrics:
    """The window cache's counters as Triton custom metrics (nothing without a cache)."""

    COUNTERS = {"hits": "requests that reused cached keys/values", "misses": "requests computed whole",
                "evictions": "entries dropped for room", "reused": "items whose keys/values came from the cache"}
    GAUGES = {"entries": "users held", "bytes": "bytes held"}

    def __init__(self, cache, version: str) -> None:
        self.cache = cache
        self.families, self.metrics, self.last = [], {}, {}  # a family must outlive its metrics
        if cache is None:
            return
        labels = {"model": "recommend", "version": str(version)}
        for names, kind in ((self.COUNTERS, pb_utils.MetricFamily.COUNTER), (self.GAUGES, pb_utils.MetricFamily.GAUGE)):
            for name, text in names.items():
                family = pb_utils.MetricFamily(name=METRICS + name, description=text, kind=kind)
                self.families.append(family)
                self.metrics[name] = family.Metric(labels=labels)
                self.last[name] = 0

    def publish(self) -> None:
        if self.cache is None:
            return
        now = {"hits": self.cache.hits, "misses": self.cache.misses, "evictions": self.cache.evictions,
               "reused": self.cache.reused, "entries": len(self.cache), "bytes": self.cache.nbytes}
        for name, value in now.items():
            if name in self.COUNTERS:
                if value > self.last[name]:
                    self.metrics[name].increment(value - self.last[name])
            else:
                self.metrics[name].set(value)
            self.last[name] = value
