"""The model on a GPU: the exactness of the memory path, training steps, and the Triton runner,
on CUDA. Skipped (with the reason) on a machine without CUDA; ``scripts/gpu-check.sh`` runs them
on one and writes what it measured."""

import os

import numpy as np
import pytest
import torch

from persrec.models.checkpoint import make_checkpoint
from persrec.models.config import ModelConfig
from persrec.models.inputs import ModelInputs
from persrec.models.layout import collate
from persrec.models.loss import Negatives, build_model, next_item_loss
from persrec.models.persrec import PerSRec
from persrec.serving.inference import ModelRunner

# PERSREC_GPU_TEST_DEVICE=cpu runs the same checks on the CPU (to check the checks themselves)
CUDA = torch.device(os.environ.get("PERSREC_GPU_TEST_DEVICE", "cuda"))
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(CUDA.type == "cuda" and not torch.cuda.is_available(),
                                                  reason="no CUDA device on this machine")]


def model(policy: str = "incremental", **kw) -> PerSRec:
    torch.manual_seed(0)
    cfg = ModelConfig(num_items=500, dim=32, num_layers=2, num_heads=2, head_dim=16, max_len=64, num_memory_tokens=4,
                      recent_len=8, segment_len=8, policy=policy, dropout=0.0, time_bias=True, request_time=True,
                      num_time_buckets=129, bias_init_std=0.5, **kw)
    return PerSRec(cfg).to(CUDA).eval()


@pytest.mark.parametrize("policy", ["recompress", "incremental"])
@torch.no_grad()
def test_memory_path_equals_the_full_pass_on_cuda(policy: str) -> None:
    m = model(policy)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 501, size=n) for n in (40, 9, 25)]
    ts = [10**9 + np.cumsum(rng.integers(0, 3600, size=len(s))) for s in seqs]
    request = np.array([t[-1] + 60 for t in ts])
    full = m(collate(seqs, m.cfg, timestamps=ts, query_timestamps=[np.append(t[1:], r) for t, r in zip(ts, request)]).to(CUDA))
    batch = collate(seqs, m.cfg)
    want = full[torch.arange(3), batch.last.to(CUDA)]
    from persrec.models.lifelong import lifelong_vectors

    got = lifelong_vectors(m, seqs, ts, request, device=CUDA) if policy == "incremental" else None
    if got is not None:
        assert (got - want).abs().max().item() <= 1e-4
    R = m.cfg.recent_len
    x = lambda rows: torch.from_numpy(ModelInputs.of_rows(rows).items).to(CUDA)  # noqa: E731
    if policy == "recompress":
        hist = [s[:-R] for s in seqs]
        mem = m.compress(x(hist), torch.tensor([len(h) for h in hist], device=CUDA), x([t[:-R] for t in ts]))
        served = m.recommend(mem, x([s[-R:] for s in seqs]), torch.tensor([R] * 3, device=CUDA), x([t[-R:] for t in ts]),
                             request_ts=torch.from_numpy(request).to(CUDA))
        assert (served - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("negatives", list(Negatives))
def test_training_steps_on_cuda_lower_the_loss(negatives: Negatives) -> None:
    m = model().train()
    rng = np.random.default_rng(1)
    seqs = [rng.integers(1, 51, size=30) for _ in range(16)]  # a small catalogue: learnable
    batch = collate([s[:-1] for s in seqs], m.cfg, [s[1:] for s in seqs],
                    [np.arange(29) * 60 for _ in seqs], [np.arange(1, 30) * 60 for _ in seqs]).to(CUDA)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, betas=(0.9, 0.98))
    gen = torch.Generator(device=CUDA).manual_seed(0)
    losses = []
    for _ in range(30):
        loss = next_item_loss(m(batch), batch.targets, m, 32, 0.05, negatives, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8


def test_the_triton_runner_on_cuda_answers_like_the_cpu() -> None:
    ck = make_checkpoint(model("recompress").cpu(), "{}")
    gpu, cpu = ModelRunner(ck, str(CUDA)), ModelRunner(ck, "cpu")
    rng = np.random.default_rng(2)
    rows = [rng.integers(1, 501, size=n) for n in (3, 8, 12)]
    x = ModelInputs.of_rows(rows, [10**9 + np.arange(len(r)) * 30 for r in rows],
                            memory=rng.standard_normal((3, *ck.config.memory_shape)).astype(np.float32),
                            has_memory=np.array([True, False, True]), request_ts=np.array([10**9 + 999] * 3))
    (ids_g, s_g), (ids_c, s_c) = gpu.recommend(x, 10), cpu.recommend(x, 10)
    assert np.allclose(s_g, s_c, atol=1e-4)
    assert np.allclose(gpu.fold(x), cpu.fold(x), atol=1e-4)
