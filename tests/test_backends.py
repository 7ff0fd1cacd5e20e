"""backends.run: an op's body runs directly in plain eager inference, and through the dispatcher
wherever the dispatcher does something (autograd, torch.compile, dispatch modes, fake tensors)."""

import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from modernbert_kernels import backends


@backends.custom_op("dispatch_probe_for_tests")
def _probe(x: torch.Tensor) -> torch.Tensor:
    # 1 added when the dispatcher called the body, 0 when backends.run did.
    return x + float(sys._getframe(1).f_code is not backends.run.__code__)


@_probe.register_fake
def _(x):
    return torch.empty_like(x)


def through_dispatcher(out: torch.Tensor, x: torch.Tensor) -> bool:
    assert torch.equal(out.detach(), x.detach()) or torch.equal(out.detach(), x.detach() + 1)
    return torch.equal(out.detach(), x.detach() + 1)


def test_plain_eager_inference_calls_the_body_directly():
    x = torch.randn(4)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            assert not through_dispatcher(backends.run(_probe, x), x)
    # A parameter is a plain tensor; without a gradient to record, grad mode changes nothing.
    weight = torch.nn.Parameter(torch.randn(4), requires_grad=False)
    assert not through_dispatcher(backends.run(_probe, weight), weight)
    assert not through_dispatcher(backends.run(_probe, x), x)


def test_a_tensor_that_needs_a_gradient_goes_through_the_dispatcher():
    x = torch.randn(4, requires_grad=True)
    out = backends.run(_probe, x)
    assert through_dispatcher(out, x)
    assert out.grad_fn is not None  # the op's autograd node (here: no formula, an error at backward)
    with torch.no_grad():
        assert not through_dispatcher(backends.run(_probe, x), x)


def test_a_dispatch_mode_sees_the_op():
    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    x = torch.randn(4)
    with torch.no_grad(), Log() as log:
        backends.run(_probe, x)
    assert any("dispatch_probe_for_tests" in name for name in log.ops), log.ops


def test_torch_compile_traces_the_op():
    x = torch.randn(4)
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(str(graph_module.code))
        return graph_module.forward

    with torch.no_grad():
        out = torch.compile(lambda t: backends.run(_probe, t), backend=backend, fullgraph=True)(x)
    assert through_dispatcher(out, x)
    assert any("dispatch_probe_for_tests" in code for code in graphs)


@pytest.mark.parametrize("subclass", ["fake", "nested_mode"])
def test_fake_tensors_take_the_fake_implementation(subclass):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode, torch.no_grad():
        x = mode.from_tensor(torch.randn(4)) if subclass == "fake" else torch.randn(4)
        out = backends.run(_probe, x)
    assert out.shape == (4,) and type(out).__name__ == "FakeTensor"
