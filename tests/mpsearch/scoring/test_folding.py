"""Batch-norm folding: same function, original untouched, only safe pairs folded."""

import torch
from torch import nn

from hw_models import Candidate, Precision
from mpsearch.metrics import accuracy
from mpsearch.scoring.analysis import analyze
from mpsearch.scoring.evaluator import Evaluator, QuantSettings
from mpsearch.scoring.folding import fold_batchnorm, foldable_pairs, remap_handles
from mpsearch.tasks import Task

P = Precision


def _bn(c: int, seed: int) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=g) * 2 - 0.5)  # some negative gammas
        bn.bias.copy_(torch.randn(c, generator=g))
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) * 3 + 0.1)
    return bn


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), _bn(8, 1), nn.ReLU(),
                                   nn.Conv2d(8, 8, 3, padding=1, groups=8), _bn(8, 2), nn.ReLU())
        self.side = nn.Conv2d(8, 4, 1)  # a BN not in a Sequential after its conv: left alone
        self.side_bn = _bn(4, 3)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))

    def forward(self, x):
        return self.head(self.side_bn(self.side(self.block(x))))


def test_folded_copy_computes_the_same_function_and_leaves_the_original():
    model = Net().eval()
    x = torch.randn(4, 3, 10, 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded, pairs = fold_batchnorm(model)
    assert pairs == [("block.0", "block.1"), ("block.3", "block.4")]
    assert isinstance(folded.block[1], nn.Identity) and isinstance(folded.side_bn, nn.BatchNorm2d)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert isinstance(model.block[1], nn.BatchNorm2d)
    # W' = W * gamma / sqrt(var + eps), by hand for one output channel
    bn = model.block[1]
    k = bn.weight[2] / torch.sqrt(bn.running_var[2] + bn.eps)
    assert torch.allclose(folded.block[0].weight[2], model.block[0].weight[2] * k, atol=1e-6)
    assert torch.allclose(folded.block[0].bias[2], bn.bias[2] - bn.running_mean[2] * k, atol=1e-6)


def test_unsafe_pairs_are_not_folded():
    model = Net().eval()
    model.block[1].train()  # training-mode BN: batch statistics, nothing to fold
    assert foldable_pairs(model) == [("block.3", "block.4")]
    tied = nn.Sequential(nn.Conv2d(2, 2, 1), _bn(2, 0)).eval()
    other = nn.Conv2d(2, 2, 1)
    other.weight = tied[0].weight  # the conv's weight is used elsewhere too
    holder = nn.ModuleDict({"seq": tied, "other": other})
    assert foldable_pairs(holder) == []
    plain = nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU())
    same, pairs = fold_batchnorm(plain)
    assert same is plain and pairs == []


def test_handles_are_remapped_onto_the_copy():
    model = Net().eval()
    analysis = analyze(model, torch.randn(2, 3, 10, 10))
    folded, _ = fold_batchnorm(model)
    handles = remap_handles(analysis.handles, model, folded)
    assert handles["block.0"].module is folded.block[0]
    assert handles["head.2"].module is folded.head[2]
    assert all(h.module is not analysis.handles[f].module for f, h in handles.items())


def test_evaluator_quantizes_the_folded_weights():
    model = Net().eval()
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(8, 3, 10, 10, generator=g) for _ in range(3)]
    with torch.no_grad():
        labels = [model(x).argmax(1) for x in xs]
    task = Task("net", model, xs[:2], list(zip(xs, labels)), "accuracy", accuracy)
    analysis = analyze(model, xs[0])
    folded_ev = Evaluator(task, analysis, QuantSettings(weight_granularity="per_tensor"))
    plain_ev = Evaluator(task, analysis, QuantSettings(weight_granularity="per_tensor", fold_batchnorm=False))
    assert folded_ev.folded == [("block.0", "block.1"), ("block.3", "block.4")] and plain_ev.folded == []
    # per-tensor int8 of the folded weight: one scale over W * k, as a runtime quantizes it
    w = folded_ev.model.block[0].weight.detach()
    scale = w.abs().max() / 127
    assert torch.allclose(folded_ev.weight("block.0", P.INT8), torch.round(w / scale) * scale, atol=1e-6)
    cand = Candidate.uniform(analysis.fqns, P.INT8, P.INT8)
    assert folded_ev.score(cand).metric >= 0.9
    fp32 = Candidate.uniform(analysis.fqns, P.FP32, P.FP32)
    for a, b in zip(folded_ev.outputs(fp32), task.outputs(model)):
        assert torch.allclose(a, b, atol=1e-5)
    folded_ev.close()
    plain_ev.close()
