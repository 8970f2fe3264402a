"""Every fast path agrees with the plain reference it replaces."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from persrec.models import hstu
from persrec.models.config import ModelConfig
from persrec.models.hstu import hstu_attention, hstu_attention_reference
from persrec.models.layout import ITEM, PAD, TOKEN, attention_mask, attention_mask_reference, causal_mask, collate
from persrec.models.loss import sampled_softmax_loss, sampled_softmax_loss_reference
from persrec.models.persrec import PerSRec


def random_attributes(rng: np.random.Generator, B: int, N: int):
    kind = torch.from_numpy(rng.choice([PAD, ITEM, TOKEN], size=(B, N)))
    seg = torch.from_numpy(rng.integers(0, 4, size=(B, N)))
    pos = torch.from_numpy(np.sort(rng.integers(0, 2 * N, size=(B, N)), axis=1))
    return kind, seg, pos


@pytest.mark.parametrize("seed", range(5))
def test_attention_mask_equals_reference_on_random_attributes(seed: int) -> None:
    rng = np.random.default_rng(seed)
    q, k = random_attributes(rng, 4, 9), random_attributes(rng, 4, 13)
    assert torch.equal(attention_mask(*q, *k), attention_mask_reference(*q, *k))
    shared_pos = (q[0], q[1], q[2][:1]), (k[0], k[1], k[2][:1])  # positions of batch 1 broadcast
    assert torch.equal(attention_mask(*shared_pos[0], *shared_pos[1]),
                       attention_mask_reference(*shared_pos[0], *shared_pos[1]))


@pytest.mark.parametrize("policy", ["recompress", "incremental"])
def test_attention_mask_equals_reference_on_training_layouts(policy: str) -> None:
    cfg = ModelConfig(num_items=50, num_memory_tokens=3, recent_len=4, segment_len=5, policy=policy)
    rng = np.random.default_rng(0)
    b = collate([rng.integers(1, 51, size=n) for n in (1, 4, 5, 9, 23)], cfg)
    args = (b.kind, b.seg, b.pos, b.kind, b.seg, b.pos)
    assert torch.equal(attention_mask(*args), attention_mask_reference(*args))


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("rab_batch", [1, 3])
@pytest.mark.parametrize("chunk", [None, 4, 64])
def test_hstu_attention_equals_reference_values_and_gradients(heads, rab_batch, chunk) -> None:
    torch.manual_seed(0)
    B, N, Dh = 3, 11, 5
    q, k, v = (torch.randn(B, N, heads, Dh, dtype=torch.float64, requires_grad=True) for _ in range(3))
    rab = torch.randn(rab_batch, N, N, dtype=torch.float64, requires_grad=True)
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    mask = causal & (torch.rand(B, N, N) > 0.2)  # causal: the chunked path may skip the rest
    inv_norm = 1 / 16
    fast = hstu_attention(q, k, v, rab, mask.double() * inv_norm, causal_chunk=chunk)
    ref = hstu_attention_reference(q, k, v, rab, mask, inv_norm)
    assert torch.allclose(fast, ref, atol=1e-12)
    g = torch.randn_like(ref)
    grads_fast = torch.autograd.grad((fast * g).sum(), (q, k, v, rab))
    grads_ref = torch.autograd.grad((ref * g).sum(), (q, k, v, rab))
    for a, b in zip(grads_fast, grads_ref):
        assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("memory_tokens", [0, 3])
def test_model_shortcuts_equal_the_general_path(memory_tokens: int, monkeypatch) -> None:
    """The plain-causal mask and the chunked attention change nothing at item positions,
    outputs or gradients (padding positions are unspecified)."""
    torch.manual_seed(0)
    cfg = ModelConfig(num_items=60, dim=16, head_dim=8, num_heads=2, max_len=40, dropout=0.0,
                      num_memory_tokens=memory_tokens, recent_len=6)
    model = PerSRec(cfg).double()
    with torch.no_grad():
        model.backbone.bias.pos_w.normal_()
    rng = np.random.default_rng(1)
    seqs = [rng.integers(1, 61, size=n) for n in (3, 17, 30, 12)]
    batch = collate(seqs, cfg, [s % 60 + 1 for s in seqs])
    items = batch.kind == ITEM

    def run():
        model.zero_grad()
        out = model(batch)[items]
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    monkeypatch.setattr(hstu.HSTUStack, "causal_chunk", 8)
    fast, fast_grads = run()
    monkeypatch.setattr(hstu.HSTUStack, "causal_chunk", None)
    monkeypatch.setattr(hstu, "causal_mask", lambda *a: None)
    general, general_grads = run()
    assert torch.allclose(fast, general, atol=1e-12)
    for a, b in zip(fast_grads, general_grads):
        assert torch.allclose(a, b, atol=1e-12)


def test_recommend_with_memory_shortcuts_equal_the_general_path(monkeypatch) -> None:
    """The serving path memory + recent items: the shared ``[ones | tril]`` mask and the chunked
    attention give the general path's user vectors, for rows of different lengths."""
    torch.manual_seed(0)
    cfg = ModelConfig(num_items=60, dim=16, head_dim=8, num_heads=2, max_len=40, dropout=0.0,
                      num_memory_tokens=3, recent_len=6)
    model = PerSRec(cfg).double().eval()
    with torch.no_grad():
        model.backbone.bias.pos_w.normal_()
    lengths = torch.tensor([1, 7, 19, 12])
    items = torch.randint(1, 61, (4, 19)) * (torch.arange(19)[None] < lengths[:, None])
    memory = torch.randn(4, *cfg.memory_shape, dtype=torch.float64)
    monkeypatch.setattr(hstu.HSTUStack, "causal_chunk", 4)
    with torch.no_grad():
        fast = model.recommend(memory, items, lengths)
    monkeypatch.setattr(hstu.HSTUStack, "causal_chunk", None)
    monkeypatch.setattr(hstu, "causal_mask", lambda *a: None)
    with torch.no_grad():
        general = model.recommend(memory, items, lengths)
    assert torch.allclose(fast, general, atol=1e-12)


def test_causal_mask_is_attention_mask_at_item_queries() -> None:
    """With and without a prefix of previous-block tokens: item query rows agree."""
    kind = torch.tensor([[ITEM, ITEM, ITEM, PAD], [ITEM, PAD, PAD, PAD]])
    seg = torch.ones_like(kind)
    for P in (0, 3):
        pos = (P + torch.arange(4)).expand(2, 4)
        pk, ps, pp = (torch.full((2, P), TOKEN), torch.zeros(2, P, dtype=torch.long),
                      torch.arange(P).expand(2, P))
        fast = causal_mask(kind, seg, pos, *((pk, ps, pp) if P else ()))
        general = attention_mask(kind, seg, pos, torch.cat([pk, kind], 1), torch.cat([ps, seg], 1),
                                 torch.cat([pp, pos], 1))
        items = kind == ITEM
        assert torch.equal(fast.expand(2, -1, -1)[items], general[items])
    # a prefix some rows cannot see (a user without memory in a fold) is not this shape
    assert causal_mask(kind, seg, 3 + torch.arange(4).expand(2, 4), torch.tensor([[TOKEN] * 3, [PAD] * 3]),
                       torch.zeros(2, 3, dtype=torch.long), torch.arange(3).expand(2, 3)) is None


def test_sampled_softmax_loss_equals_reference() -> None:
    torch.manual_seed(0)
    emb = torch.nn.Embedding(31, 8)
    vectors = lambda ids: F.normalize(emb(ids), dim=-1)  # noqa: E731
    hidden = F.normalize(torch.randn(4, 7, 8), dim=-1).requires_grad_()
    targets = torch.randint(0, 31, (4, 7))
    targets[0, 0] = 0  # positions without a target are skipped
    values, grads = [], []
    for loss_fn in (sampled_softmax_loss, sampled_softmax_loss_reference):
        gen = torch.Generator().manual_seed(3)
        loss = loss_fn(hidden, targets, vectors, 30, 40, 0.05, gen)  # 40 draws of 30: collisions
        values.append(loss)
        grads.append(torch.autograd.grad(loss, (hidden, emb.weight)))
    assert torch.allclose(values[0], values[1], atol=1e-5)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5)
