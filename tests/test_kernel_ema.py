"""kernels.ema_ against torch._foreach_lerp_, and flatten_params: parameters as views of flat per-dtype buffers."""
import copy

import pytest
import torch
from torch import nn

from vjepa_fast.kernels import ema_, ema_reference_, flatten_params
from helpers import KERNEL_DEVICES as DEVICES

# fp64 buffers with a Python-float momentum get the weight 1 - momentum as a kernel fp32 scalar. bf16: within one
# ulp (2^-7 relative) of the exact result (a GPU rounds the fp32 result to nearest, Triton's interpreter truncates).
TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-6}, torch.bfloat16: {"rtol": 2 ** -7, "atol": 1e-6},
       torch.float64: {"rtol": 1e-7, "atol": 1e-9}}
MOMENTUM = 0.9  # moves a bf16 target by ~0.1 * |source - target|: many ulps


def pair(n, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g).to(device, dtype), torch.randn(n, generator=g).to(device, dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", ["float", "tensor_fp32", "tensor_fp64"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("n", [1, 7, 4095, 4096, 4097, 100_003])
def test_matches_foreach_lerp(n, dtype, momentum, device):
    target, source = pair(n, dtype, device, seed=n)
    m = {"float": MOMENTUM, "tensor_fp32": torch.tensor(MOMENTUM, device=device),
         "tensor_fp64": torch.tensor(MOMENTUM, dtype=torch.float64, device=device)}[momentum]
    expected = target.double()
    ema_reference_(expected, source.double(), m)
    before = target.clone()
    ema_(target, source, m)
    exact = dtype == torch.float64 and momentum == "tensor_fp64"  # no fp32 step anywhere
    torch.testing.assert_close(target.double(), expected, **({"rtol": 1e-13, "atol": 1e-13} if exact else TOL[dtype]))
    assert not torch.equal(target, before)  # the update is visible at every dtype: a kernel that skips it fails


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum,expect", [(1.0, "target"), (0.0, "source")])
def test_momentum_one_keeps_target_and_zero_copies_source(momentum, expect, device):
    target, source = pair(1000, torch.float32, device, seed=1)
    expected = {"target": target, "source": source}[expect].clone()
    ema_(target, source, torch.tensor(momentum, device=device))
    assert torch.equal(target, expected)


class Net(nn.Module):
    """Two dtypes and a frozen parameter: two flat buffers, frozen values carried along."""

    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3, bias=False)
        self.scale = nn.Parameter((0.5 + torch.rand(3)).to(torch.bfloat16))
        self.frozen = nn.Parameter(torch.arange(4.0), requires_grad=False)

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x))) * self.scale.float() + self.frozen.sum()


def net(device, seed):
    torch.manual_seed(seed)
    return Net().to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_flatten_params_keeps_values_and_makes_views(device):
    model = net(device, seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params_before = list(model.parameters())
    flat = flatten_params(model)

    assert [b.dtype for b in flat.buffers] == [torch.bfloat16, torch.float32]  # order of first appearance
    for p, b, offset in flat.views:
        assert p.data_ptr() == flat.buffers[b].data_ptr() + offset * p.element_size() and p.is_contiguous()
        assert p.data_ptr() % 64 == 0  # aligned like a separate allocation (the buffer itself is >= 64-byte aligned)
    assert list(model.parameters()) == params_before  # same Parameter objects
    assert model.state_dict().keys() == before.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) and v.dtype == before[k].dtype and v.shape == before[k].shape
    assert not model.frozen.requires_grad and model.fc1.weight.requires_grad
    for buf in flat.buffers:
        buf.fill_(3)
    assert all(torch.equal(p, torch.full_like(p, 3)) for p in model.parameters())


@pytest.mark.parametrize("device", DEVICES)
def test_optimizer_steps_on_flat_params_match_unflattened(device):
    plain = net(device, seed=3)
    model = copy.deepcopy(plain)
    flat = flatten_params(model)
    opts = [torch.optim.AdamW(m.parameters(), lr=0.1) for m in (plain, model)]
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(4)).to(device)
    for _ in range(3):
        for m, opt in zip((plain, model), opts):
            opt.zero_grad()
            m(x).square().sum().backward()
            opt.step()
    flat.check()
    for p, q in zip(plain.parameters(), model.parameters()):
        torch.testing.assert_close(q, p)
    assert not torch.equal(model.fc1.weight, net(device, seed=3).fc1.weight)  # the steps moved the weights


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.996, "tensor"])
def test_ema_of_flat_modules_matches_reference(momentum, device):
    m = torch.tensor(0.996, device=device) if momentum == "tensor" else momentum
    source, target = net(device, seed=5), net(device, seed=6)
    with torch.no_grad():
        source.scale.mul_(100)  # the bf16 update, 0.004 * |source - target|, far above bf16's resolution
        source.frozen.add_(1.0)
    assert not torch.equal(source.scale, target.scale)
    ref_source, ref_target = copy.deepcopy(source), copy.deepcopy(target)
    before = [p.clone() for p in target.parameters()]
    ema_(flatten_params(target), flatten_params(source), m)
    ema_reference_(list(ref_target.parameters()), list(ref_source.parameters()), m)
    for p, q, start, s in zip(ref_target.parameters(), target.parameters(), before, source.parameters()):
        torch.testing.assert_close(q, p, **TOL[p.dtype])
        assert torch.equal(q, start) == torch.equal(s, start)  # each parameter that differed moved, bf16 included


@pytest.mark.parametrize("device", DEVICES)
def test_replaced_data_is_detected(device):
    source, target = net(device, seed=7), net(device, seed=8)
    flat_s, flat_t = flatten_params(source), flatten_params(target)
    target.fc2.weight.data = target.fc2.weight.data.clone()
    with pytest.raises(RuntimeError, match=r"a parameter of shape \[3, 7\] no longer views its flat buffer"):
        ema_(flat_t, flat_s, 0.99)


def _bad_inputs(device):
    t = torch.zeros(8, device=device)
    return [
        ((t, torch.zeros(9, device=device), 0.9), ValueError,
         r"source is torch.float32 \[9\], target is torch.float32 \[8\]"),
        ((t, t.double(), 0.9), ValueError, r"source is torch.float64 \[8\], target is torch.float32 \[8\]"),
        ((torch.zeros(4, 4, device=device).t(), torch.zeros(4, 4, device=device), 0.9), ValueError,
         r"target and source must be contiguous"),
        ((t.long(), t.long(), 0.9), TypeError, r"ema_: target has dtype torch.int64"),
        ((t, t.clone(), 1.5), ValueError, r"momentum must be a float in \[0, 1\] or a 0-d tensor"),
        ((t, t.clone(), torch.zeros(1, device=device)), ValueError, r"ema_: momentum must be 0-D, got shape \[1\]"),
        ((t, t.clone(), torch.tensor(0.9, device="meta")), ValueError, r"momentum is on meta, expected"),
        ((t, flatten_params(nn.Linear(2, 2).to(device)), 0.9), TypeError, r"both be tensors or both FlatParams"),
        ((flatten_params(nn.Linear(2, 2).to(device)), flatten_params(nn.Linear(2, 3).to(device)), 0.9), ValueError,
         r"target and source FlatParams differ in layout"),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(len(_bad_inputs("cpu"))))
def test_bad_inputs_name_the_argument(case, device):
    args, error, match = _bad_inputs(device)[case]
    with pytest.raises(error, match=match):
        ema_(*args)
