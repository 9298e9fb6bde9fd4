"""Re-estimating running statistics (mabn.studies.eval_statistics) against the estimators
written out by hand on a small conv-norm stack."""

import pytest
import torch
from torch import nn

import mabn
from mabn.studies.eval_statistics import reestimate, top1_error


def stack(norm):
    torch.manual_seed(0)
    layer = mabn.norm_layer(norm)
    return nn.Sequential(nn.Conv2d(3, 4, 3), layer(4), nn.ReLU(), nn.Conv2d(4, 5, 1), layer(5))


@pytest.mark.parametrize("norm", ["bn", "cbn", "brn"])
@pytest.mark.parametrize("group,unbiased", [(None, False), (2, True), (4, False)])
def test_reestimate_sets_each_layer_from_the_input_it_sees_after_the_layers_above(norm, group, unbiased):
    model = mabn.wire_norms(stack(norm))
    images = torch.randn(8, 3, 6, 6, dtype=torch.float64) * 3 + 1
    model.double()
    assert reestimate(model, images, group, unbiased) == 2

    def expected(x):
        per_channel = x.transpose(0, 1).flatten(1)
        if group is None:
            return per_channel.mean(1), per_channel.var(1, unbiased=False)
        groups = [x[i : i + group].transpose(0, 1).flatten(1) for i in range(0, len(x), group)]
        return per_channel.mean(1), torch.stack([g.var(1, unbiased=unbiased) for g in groups]).mean(0)

    first = model[0](images)
    for layer, x in ((model[1], first), (model[4], model[3](model[2](model[1](first))))):
        mean, var = expected(x)
        torch.testing.assert_close(layer.running_mean, mean)
        torch.testing.assert_close(layer.running_var, var)
    assert not model.training


def test_reestimate_refuses_images_that_do_not_split_into_groups():
    with pytest.raises(ValueError, match="groups of 4: use a multiple of 4"):
        reestimate(mabn.wire_norms(stack("bn")), torch.randn(6, 3, 6, 6), 4)


def test_top1_error_counts_the_wrong_argmax():
    model = nn.Flatten()
    images = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.2, 0.1]])
    assert top1_error(model, images, torch.tensor([1, 1, 1, 0]), batch=3) == 25.0
