"""The pipeline's two-pass backward ([Note: split backward] in parallel/pipeline/backward.py), in one process:
input gradient first, weight gradients after, equal to one ``backward()`` of the same stage."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from parallel.pipeline.backward import SplitBackward, enabled


@pytest.fixture(autouse=True)
def _split_on_cpu(monkeypatch):
    monkeypatch.setenv("TOPOCOMM_PIPELINE_SPLIT_BACKWARD", "1")  # CPU tensors: off unless asked for


class Twice(nn.Module):
    """One Linear applied twice (its weight reached through two recorded outputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 5)

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x)))


class Tied(nn.Module):
    """Uses its child's weight directly: a parameter reached outside the module that owns it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 5)

    def forward(self, x):
        return self.lin(x) + x @ self.lin.weight


class Scaled(nn.Module):
    """A parameter of its own next to a child's."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 5)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 5))

    def forward(self, x):
        return self.lin(x) * self.scale


class Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 5)

    def forward(self, x):
        return checkpoint(self.lin, x, use_reentrant=True)


class Pair(nn.Module):
    """Holds a parameter and returns a tuple whose second output is computed from the first: its weight
    gradient is taken in pass 1 (pass 2 from the second output would flow into the first)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, 5))

    def forward(self, x):
        y = x * self.w
        return y, y * 2


class First(nn.Module):
    def forward(self, xy):
        return xy[0] + xy[1]

    @staticmethod
    def of_pair() -> nn.Module:
        return nn.Sequential(_Dup(), First())


class _Dup(nn.Module):
    def forward(self, x):
        return x, torch.sin(x)


class Attention(nn.Module):
    """MultiheadAttention returns a tuple and uses its out_proj's weight without running out_proj."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)

    def forward(self, x):
        out, weights = self.attn(x, x, x)  # need_weights: a second output with a graph, used below
        return out + weights.sum(-1, keepdim=True)


class TiedPair(nn.Module):
    """Two Linears sharing one weight Parameter (tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 5), nn.Linear(5, 5)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _frozen() -> nn.Module:
    m = nn.Sequential(nn.Linear(5, 5), nn.GELU(), nn.Linear(5, 5))
    m[0].weight.requires_grad_(False)
    return m


CASES = {  # name -> (stage builder, whether it splits)
    "linear-gelu-layernorm": (lambda: nn.Sequential(nn.Linear(5, 5), nn.GELU(), nn.LayerNorm(5), nn.Linear(5, 5)),
                              True),
    "inplace-relu": (lambda: nn.Sequential(nn.Linear(5, 5), nn.ReLU(inplace=True), nn.Linear(5, 5)), True),
    "shared-module": (lambda: nn.Sequential(Twice(), nn.Linear(5, 5)), False),
    "parent-and-child-parameters": (lambda: nn.Sequential(Scaled(), nn.Tanh()), True),
    "frozen-weight": (_frozen, True),
    "tied-weight": (lambda: nn.Sequential(Tied(), nn.Linear(5, 5)), False),
    "tied-parameter-in-two-modules": (lambda: nn.Sequential(TiedPair()), False),
    "transformer-encoder-layer": (lambda: nn.Sequential(
        nn.TransformerEncoderLayer(6, 2, dim_feedforward=12, dropout=0.0, batch_first=True),
        nn.TransformerEncoderLayer(6, 2, dim_feedforward=12, dropout=0.0, batch_first=True)), True),
    "attention-with-weights": (lambda: nn.Sequential(Attention(), nn.Linear(6, 6)), True),
    "reentrant-checkpoint": (lambda: nn.Sequential(Checkpointed(), nn.Linear(5, 5)), False),
    "tuple-output": (lambda: nn.Sequential(Pair(), First(), nn.Linear(5, 5)), True),
    "tuple-inside-a-parameter-free-module": (lambda: nn.Sequential(nn.Sequential(nn.Linear(5, 5)), First.of_pair(),
                                                                   nn.Linear(5, 5)), True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_two_passes_equal_one_backward(name):
    build, splits = CASES[name]
    torch.manual_seed(0)
    ref = build().double()
    stage = copy.deepcopy(ref)
    split = SplitBackward({1: stage})
    shape = (2, 3, 6) if name in ("transformer-encoder-layer", "attention-with-weights") else (3, 5)
    for step in range(2):  # gradients accumulate across micro-batches, as in a pipeline step
        x = torch.randn(*shape, dtype=torch.float64)
        dy = torch.randn(*shape, dtype=torch.float64)

        x_ref = x.clone().requires_grad_()
        ref(x_ref).backward(dy)

        inp = x.clone().requires_grad_()
        out, records = split.forward(lambda: stage(inp))
        g, weights = split.input_grad(1, out, dy, inp, records)
        assert (weights is not None) == splits, name
        if weights is not None:
            if step == 0:  # some weight gradients wait for pass 2
                assert any(p.grad is None for p in stage.parameters() if p.requires_grad), name
            weights()
        torch.testing.assert_close(g, x_ref.grad, rtol=0, atol=1e-13)
    for (n, p), q in zip(stage.named_parameters(), ref.parameters()):
        if q.grad is None:
            assert p.grad is None, n
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-13, msg=n)
    later = split.verdict[1]
    assert (later is not None and any(later)) == splits


def test_caller_can_rule_the_split_out():
    stage = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    split = SplitBackward({1: stage})
    inp = torch.randn(2, 4, requires_grad=True)
    out, _ = split.forward(lambda: stage(inp))
    g, weights = split.input_grad(1, out, torch.ones(2, 4), inp, None)  # records None: one pass
    assert weights is None and g is not None and stage[0].weight.grad is not None
    assert split.verdict == {}  # nothing decided for later backwards


@pytest.mark.parametrize("name,want", [
    ("linear-gelu-layernorm", (True, True, True)),
    ("inplace-relu", (False, True)),  # the ReLU rewrote the first Linear's output: its dW needs the ReLU's backward
    ("attention-with-weights", (False, True)),  # from the attention's output back to in_proj: all of it
    ("tuple-output", (False, True)),
    ("transformer-encoder-layer", None),  # checked below: the attention now, its Linears and norms later
])
def test_which_calls_wait_for_pass_2(name, want):
    torch.manual_seed(0)
    stage = CASES[name][0]().double()
    split = SplitBackward({1: stage})
    shape = (2, 3, 6) if name in ("attention-with-weights", "transformer-encoder-layer") else (3, 5)
    inp = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    out, records = split.forward(lambda: stage(inp))
    split.input_grad(1, out, torch.ones_like(out), inp, records)
    if want is None:
        got = {(type(m).__name__, lat) for (m, _), lat in zip(records, split.verdict[1])}
        assert got == {("MultiheadAttention", False), ("Linear", True), ("LayerNorm", True)}, got
    else:
        assert split.verdict[1] == want


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("TOPOCOMM_PIPELINE_SPLIT_BACKWARD", "0")
    stage = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    split = SplitBackward({1: stage})
    inp = torch.randn(2, 4, requires_grad=True)
    out, records = split.forward(lambda: stage(inp))
    _, weights = split.input_grad(1, out, torch.ones(2, 4), inp, records)
    assert weights is None and stage[0].weight.grad is not None


def test_the_setting(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.delenv("TOPOCOMM_PIPELINE_SPLIT_BACKWARD")
    assert not enabled(cpu) and enabled(cuda)
    monkeypatch.setenv("TOPOCOMM_PIPELINE_SPLIT_BACKWARD", "0")
    assert not enabled(cuda)
    monkeypatch.setenv("TOPOCOMM_PIPELINE_SPLIT_BACKWARD", "yes")
    with pytest.raises(ValueError, match="TOPOCOMM_PIPELINE_SPLIT_BACKWARD"):
        enabled(cpu)


def test_hooks_are_seen_and_recording_is_scoped():
    stage = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    split = SplitBackward({1: stage})
    assert not split.hooked(1) and not split.hooked(0)
    stage[2].weight.register_post_accumulate_grad_hook(lambda p: None)
    assert split.hooked(1)
    stage(torch.randn(1, 4))  # outside split.forward nothing is recorded
    _, records = split.forward(lambda: stage(torch.randn(1, 4)))
    assert [m for m, _ in records] == [stage[0], stage[2]]
