"""Triton python-backend model ``encode_items``: item texts -> text embeddings, with the frozen
sentence encoder the served model was trained with (parameter ``text_encoder``,
``models.text.encoder_named``), on the GPU when the instance has one.

Input (per row): TEXT bytes [1] (UTF-8). Output: EMBEDDING fp32 [E].
"""

import numpy as np
import triton_python_backend_utils as pb_utils

from persrec.serving.inference import encoder_from_triton_args
from persrec.serving.triton_batch import split_rows


class TritonPythonModel:
    def initialize(self, args):
        self.encoder = encoder_from_triton_args(args)

    def execute(self, requests):
        texts = [np.asarray(pb_utils.get_input_tensor_by_name(r, "TEXT").as_numpy()).reshape(-1) for r in requests]
        sizes = [len(t) for t in texts]
        flat = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for part in texts for t in part.tolist()]
        vectors = self.encoder.encode(flat).astype(np.float32)
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("EMBEDDING", v)])
                for v in split_rows(vectors, sizes)]
