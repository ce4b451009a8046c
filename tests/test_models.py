import pytest
import torch

from fedunlearn.errors import ConfigError
from fedunlearn.models import MODEL_BUILDERS, build_model, models_for


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


def test_simple_cnn_wide_has_the_posters_wide_fc_layer_on_28x28_images():
    model = build_model("simple-cnn-wide", (1, 28, 28), num_classes=10)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes == {
        "conv1.weight": (16, 1, 3, 3), "conv1.bias": (16,),
        "conv2.weight": (32, 16, 3, 3), "conv2.bias": (32,),
        # 32 channels x 28 x 28 = 25088 = 512 x 7 x 7, VGG-11's first FC input on ImageNet-size images
        "fc1.weight": (128, 25088), "fc1.bias": (128,),
        "fc2.weight": (10, 128), "fc2.bias": (10,),
    }
    # No pooling: fc1 reads conv2's full-resolution map, flattened channel-major.
    x = torch.randn(2, 1, 28, 28)
    features = torch.relu(model.conv2(torch.relu(model.conv1(x))))
    assert features.shape == (2, 32, 28, 28)
    expected = model.fc2(torch.relu(model.fc1(features.flatten(start_dim=1))))
    assert torch.allclose(model(x), expected)
    # KFAC's A factor of fc1 is (25088 + 1)^2 with the bias: 2.5 GB in float32.
    assert (model.fc1.in_features + 1) ** 2 * 4 == 2_517_831_684
    # 8x8 digits: a 2048-wide fc1; simple-cnn itself is unchanged (two poolings, fc1 reads 64 x 7 x 7).
    assert build_model("simple-cnn-wide", (1, 8, 8), 10).fc1.in_features == 32 * 8 * 8
    plain = build_model("simple-cnn", (1, 28, 28), 10)
    assert plain.fc1.in_features == 64 * 7 * 7 and plain.conv1.out_channels == 32
    assert "simple-cnn-wide" not in models_for((1, 40))  # images only
