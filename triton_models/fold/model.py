"""Triton python-backend model ``fold``: (memory, segment) -> new memory.

Inputs (per row): MEMORY fp32 [L,2,M,H,Dh], HAS_MEMORY bool [1] (False: the segment alone, as a
new user's first fold), ITEMS int64 [S], TIMESTAMPS int64 [S], LENGTHS int64 [1], and for a
model that reads items by their text CATALOGUE int64 [2] (as ``recommend``'s). Output:
NEW_MEMORY fp32.
"""

import triton_python_backend_utils as pb_utils

from persrec.serving.inference import catalogue_from_triton_args, runner_from_triton_args
from persrec.serving.triton_batch import model_inputs, split_rows


class TritonPythonModel:
    def initialize(self, args):
        self.runner, params = runner_from_triton_args(args)
        self.catalogue = catalogue_from_triton_args(self.runner, params)

    def execute(self, requests):
        names = ["MEMORY", "HAS_MEMORY", "ITEMS", "TIMESTAMPS", "LENGTHS"] + (["CATALOGUE"] if self.catalogue else [])
        x, sizes = model_inputs([{n: pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in names} for r in requests])
        if self.catalogue and (error := self.catalogue.unavailable(x)):
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(error)) for _ in requests]
        return [
            pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("NEW_MEMORY", m)])
            for m in split_rows(self.runner.fold(x), sizes)
        ]
