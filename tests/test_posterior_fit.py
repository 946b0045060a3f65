"""LastLayerLaplace.fit: image sources, reproducibility, model state, and refusals."""

import pytest
import torch
from diffusers import DDPMScheduler
from test_posterior_models import tiny_scheduler
from tiny_models import tiny_condition_unet, tiny_unet
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayesdiff_ext import LastLayerLaplace


def _images(n=5):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(2))


def _fit(unet, images, structure="diag", seed=0, **kwargs):
    post = LastLayerLaplace(unet, structure)
    kwargs.setdefault("batch_size", 2)
    return post.fit(images, tiny_scheduler(), generator=torch.Generator().manual_seed(seed), progress=False, **kwargs)


def _curvature(post):
    return post.posterior.tensors()


def test_tensor_dataset_and_loader_give_the_same_posterior():
    unet, images = tiny_unet(), _images()
    labels = torch.arange(len(images))
    from_tensor = _fit(unet, images)
    from_dataset = _fit(unet, TensorDataset(images, labels))
    from_loader = _fit(unet, DataLoader(TensorDataset(images, labels), batch_size=2))
    for other in (from_dataset, from_loader):
        for k, v in _curvature(from_tensor).items():
            torch.testing.assert_close(_curvature(other)[k], v, rtol=0, atol=0)
        assert other.sigma_noise == from_tensor.sigma_noise
    assert from_tensor.fit_stats.n_images == 5 and from_tensor.fit_stats.n_samples == 5


def test_generator_makes_fit_reproducible_and_timesteps_multiply_samples():
    unet, images = tiny_unet(), _images()
    a, b, c = _fit(unet, images, seed=1), _fit(unet, images, seed=1), _fit(unet, images, seed=2)
    assert a.sigma_noise == b.sigma_noise != c.sigma_noise
    multi = _fit(unet, images, timesteps_per_image=3)
    assert multi.fit_stats.n_samples == 15 and multi.fit_stats.timesteps_per_image == 3
    assert multi.fit_stats.residual_elements == 15 * 3 * 8 * 8


@pytest.mark.parametrize("training", [True, False])
def test_fit_runs_in_eval_without_grad_and_restores_mode(training):
    unet = tiny_unet().train(training)
    seen = []
    handle = unet.register_forward_pre_hook(lambda m, args: seen.append((m.training, torch.is_grad_enabled())))
    _fit(unet, _images(3), structure="full")
    handle.remove()
    assert seen and all(state == (False, False) for state in seen)
    assert all(m.training == training for m in unet.modules())
    assert torch.is_grad_enabled()


def test_condition_unet_with_model_kwargs_callable():
    unet = tiny_condition_unet()
    images = torch.randn(4, 4, 8, 8)
    context = torch.randn(1, 5, 8)
    post = LastLayerLaplace(unet, "diag").fit(
        images,
        tiny_scheduler(),
        batch_size=3,
        progress=False,
        model_kwargs=lambda x0: {"encoder_hidden_states": context.expand(len(x0), -1, -1)},
    )
    assert post.fit_stats.n_images == 4 and post.prior_precision > 0


def test_fit_refuses_unknown_prediction_types_and_empty_data():
    unet = tiny_unet()
    with pytest.raises(ValueError, match="prediction_type='flow_prediction'; the fit follows"):
        LastLayerLaplace(unet).fit(_images(2), DDPMScheduler(num_train_timesteps=10, prediction_type="flow_prediction"))
    with pytest.raises(ValueError, match="empty"):
        LastLayerLaplace(unet).fit(torch.zeros(0, 3, 8, 8), tiny_scheduler(), progress=False)
    with pytest.raises(TypeError, match="must be a tensor, a Dataset or a DataLoader"):
        LastLayerLaplace(unet).fit([1, 2], tiny_scheduler(), progress=False)


class _Rescaled(nn.Module):
    """A model whose output is its head's output times two (not what the posterior describes)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 4, 3, padding=1)
        self.out = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x, timestep):
        return 2 * self.out(torch.relu(self.body(x)))


def test_fit_refuses_a_model_that_post_processes_its_head():
    model = _Rescaled()
    post = LastLayerLaplace(model, head=model.out)
    with pytest.raises(ValueError, match="is not the output of its head"):
        post.fit(_images(2), tiny_scheduler(), progress=False)
