import pytest
import torch

from fedunlearn.errors import ConfigError
from fedunlearn.models import MODEL_BUILDERS, build_model


@pytest.mark.parametrize("name", sorted(MODEL_BUILDERS))
@pytest.mark.parametrize("input_shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_every_model_maps_the_data_sets_input_to_class_logits(name, input_shape):
    torch.manual_seed(0)
    model = build_model(name, input_shape, num_classes=7)
    logits = model(torch.randn(3, *input_shape))
    assert logits.shape == (3, 7)
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_logreg_is_linear_with_an_l2_penalty_on_weights_only():
    model = build_model("logreg", (1, 8, 8), 10)
    assert [name for name, _ in model.named_parameters()] == ["linear.weight", "linear.bias"]
    with torch.no_grad():
        model.linear.weight.fill_(2.0)
        model.linear.bias.fill_(5.0)
    assert model.regularizer().item() == pytest.approx(0.5 * model.l2 * 4.0 * 640)


def test_unknown_model_is_a_config_error():
    with pytest.raises(ConfigError) as caught:
        build_model("vgg99", (1, 8, 8), 10)
    assert "simple-cnn" in caught.value.one_line()
