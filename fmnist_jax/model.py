"""The Fashion-MNIST CNN of the PyTorch original, in Flax Linen.

Two blocks of (3x3 conv, ReLU, 3x3 conv, ReLU, 2x2 max-pool), then one dense
layer giving 10 logits. Every convolution has the same parameters whichever
implementation computes it, so a checkpoint restores under either.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn


def resolve_conv(conv: str, backend: str | None = None) -> str:
    """Return the convolution implementation for `conv`, choosing by backend for "auto".

    XLA's own convolution is fast on GPU and TPU, but on CPU its backward pass for
    small images and few channels is several times slower than a matmul over patches.
    """
    if conv != "auto":
        return conv
    backend = backend or jax.default_backend()
    return "matmul" if backend == "cpu" else "xla"


class Conv3x3(nn.Module):
    """A 3x3 'SAME' convolution with bias, parameter-compatible with `nn.Conv`."""

    features: int
    implementation: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (3, 3, channels, self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        if self.implementation == "xla":
            y = jax.lax.conv_general_dilated(
                x, kernel, window_strides=(1, 1), padding="SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"))
        elif self.implementation == "matmul":
            y = _conv3x3_as_matmul(x, kernel)
        else:
            raise ValueError(f"unknown convolution implementation {self.implementation!r}")
        return y + bias


def _conv3x3_as_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Compute a 3x3 'SAME' convolution as one matmul over the nine shifted images."""
    batch, height, width, channels = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    # Tap (i, j) of the kernel sees the image shifted by (i - 1, j - 1). The
    # concatenation order, row tap outer and channel inner, matches HWIO.reshape.
    patches = jnp.concatenate(
        [padded[:, i:i + height, j:j + width, :] for i in range(3) for j in range(3)], axis=-1)
    y = patches.reshape(-1, 9 * channels) @ kernel.reshape(9 * channels, -1)
    return y.reshape(batch, height, width, -1)


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """Take the max over each 2x2 window with stride 2 (height and width must be even).

    A reshape and a max compile to a cheaper backward pass on CPU than
    `nn.max_pool`, whose gradient is a select-and-scatter.
    """
    batch, height, width, channels = x.shape
    return x.reshape(batch, height // 2, 2, width // 2, 2, channels).max(axis=(2, 4))


class CNN(nn.Module):
    """Maps a batch of (28, 28, 1) images in [0, 1] to (batch, 10) logits."""

    width: int = 8
    conv: str = "xla"

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = images
        for _ in range(2):
            x = nn.relu(Conv3x3(self.width, self.conv)(x))
            x = nn.relu(Conv3x3(self.width, self.conv)(x))
            x = max_pool_2x2(x)
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(10)(x)
