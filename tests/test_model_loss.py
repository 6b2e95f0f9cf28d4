import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_batch, tiny_config
from vjepa_fast.model import VJEPA


def _model(*overrides):
    torch.manual_seed(0)
    return VJEPA(tiny_config(*overrides)).double()


def test_reference_loss_is_the_official_objective():
    model = _model()
    clips, enc, pred = tiny_batch(tiny_config())
    clips = clips.double()
    with torch.no_grad():
        model.predictor.mask_tokens[0].normal_()
        model.predictor.mask_tokens[1].normal_()
        h = F.layer_norm(model.target_encoder(clips), (32,), eps=1e-5)
        expected = 0.0
        for i in range(2):  # per mask: its own encoder pass, predictor pass with its own mask token
            z = model.encoder(clips, enc[i])
            x = model.predictor.predictor_embed(z) + model.predictor.predictor_pos_embed[0, enc[i]]
            tgt = model.predictor.mask_tokens[i] + model.predictor.predictor_pos_embed[0, pred[i]]
            x = torch.cat([x, tgt], dim=1)
            for blk in model.predictor.predictor_blocks:
                x = blk(x)
            z = model.predictor.predictor_proj(model.predictor.predictor_norm(x)[:, enc[i].size(1):])
            target = torch.stack([h[b, pred[i][b]] for b in range(clips.size(0))])
            expected += (z - target).abs().mean()
        expected /= 2
    torch.testing.assert_close(model.loss(clips, enc, pred), expected)


def test_gradients_reach_encoder_and_predictor_but_not_target():
    model = _model()
    clips, enc, pred = tiny_batch(tiny_config())
    model.loss(clips.double(), enc, pred).backward()
    assert all(p.grad is None for p in model.target_encoder.parameters())
    assert model.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert all(t.grad.abs().sum() > 0 for t in model.predictor.mask_tokens)  # one token per mask config
    assert model.encoder.pos_embed.grad is None


def test_target_encoder_starts_as_a_copy_and_is_frozen():
    model = _model()
    for a, b in zip(model.encoder.state_dict().values(), model.target_encoder.state_dict().values()):
        assert torch.equal(a, b)
    assert not any(p.requires_grad for p in model.target_encoder.parameters())


def test_loss_exp_and_errors():
    model = _model("loss.loss_exp=2.0")
    clips, enc, pred = tiny_batch(tiny_config())
    loss2 = model.loss(clips.double(), enc, pred)
    model.loss_exp = 1.0
    loss1 = model.loss(clips.double(), enc, pred)
    assert not torch.isclose(loss1, loss2)
    with pytest.raises(ValueError, match="unknown loss computation 'turbo'"):
        model.loss(clips.double(), enc, pred, computation="turbo")
    with pytest.raises(ValueError, match="2 context masks but 1"):
        model.loss(clips.double(), enc, pred[:1])


@pytest.mark.parametrize("fp32_residual, dtype", [(True, torch.float32), (False, torch.bfloat16)])
def test_predictor_residual_dtype_under_autocast(fp32_residual, dtype):
    cfg = tiny_config(f"model.predictor_fp32_residual={str(fp32_residual).lower()}")
    torch.manual_seed(0)
    model = VJEPA(cfg)
    clips, enc, pred = tiny_batch(cfg)
    seen = []
    hook = model.predictor.predictor_blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.loss(clips, enc, pred)
    hook.remove()
    assert seen == [dtype, dtype]
