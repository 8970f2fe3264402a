"""Triton python-backend model ``recommend``: memory + recent window -> top-k items.

Inputs (per row): MEMORY fp32 [L,2,M,H,Dh], HAS_MEMORY bool [1], ITEMS int64 [W],
TIMESTAMPS int64 [W], LENGTHS int64 [1]. Outputs: TOP_IDS int64 [k], TOP_SCORES fp32 [k].
Requests that Triton's dynamic batcher hands over together run as one batch.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from persrec.serving.inference import ModelRunner
from persrec.serving.triton_batch import concat_rows, split_rows


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        device = "cpu"
        if args["model_instance_kind"] == "GPU":
            device = f"cuda:{args['model_instance_device_id']}"
        path = Path(args["model_repository"]) / args["model_version"] / "checkpoint.pt"
        self.runner = ModelRunner(path, device, cpu_threads=int(params.get("cpu_threads", "1")))
        if self.runner.model_version != params["model_version"]:
            raise RuntimeError(f"checkpoint {self.runner.model_version} != config {params['model_version']}")
        self.top_k = int(params["top_k"])
        self.exclude_seen = params.get("exclude_seen", "true") == "true"
        self.has_memory = self.runner.cfg.has_memory

    def execute(self, requests):
        names = ["ITEMS", "TIMESTAMPS", "LENGTHS"] + (["MEMORY", "HAS_MEMORY"] if self.has_memory else [])
        arrays, sizes = concat_rows(
            [{n: pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in names} for r in requests],
            pad=("ITEMS", "TIMESTAMPS"),
        )
        ids, scores = self.runner.recommend(
            arrays.get("MEMORY"), arrays.get("HAS_MEMORY"), arrays["ITEMS"], arrays["LENGTHS"],
            arrays["TIMESTAMPS"], self.top_k, self.exclude_seen,
        )
        return [
            pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("TOP_IDS", i), pb_utils.Tensor("TOP_SCORES", s.astype(np.float32)),
            ])
            for i, s in zip(split_rows(ids, sizes), split_rows(scores, sizes))
        ]
