"""The Fashion-MNIST CNN of the PyTorch original, in Flax Linen.

Two blocks of (3x3 conv, ReLU, 3x3 conv, ReLU, 2x2 max-pool), then one dense
layer giving 10 logits. Every convolution has the same parameters whichever
implementation computes it, so a checkpoint restores under either.
"""

from __future__ import annotations

import jax
from flax import linen as nn

from fmnist_jax import conv_cpu


def resolve_conv(conv: str, backend: str | None = None) -> str:
    """Return the convolution implementation for `conv`, choosing by backend for "auto".

    XLA's own convolution is fast on GPU and TPU, but on CPU its backward pass for
    small images and few channels is several times slower than `conv_cpu`'s matmuls.
    """
    if conv != "auto":
        return conv
    backend = backend or jax.default_backend()
    return "matmul" if backend == "cpu" else "xla"


class Conv3x3(nn.Module):
    """A 3x3 'SAME' convolution with bias, then ReLU, then optionally a 2x2 max-pool.

    Its params, `kernel` (3, 3, C, F) HWIO and `bias` (F,), are those of `nn.Conv`.
    The "xla" implementation takes NHWC input; "matmul" takes (C, H, W, N), the
    layout of `conv_cpu`.
    """

    features: int
    implementation: str = "xla"
    pool: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.implementation not in ("xla", "matmul"):
            raise ValueError(f"unknown convolution implementation {self.implementation!r}")
        channels = x.shape[-1] if self.implementation == "xla" else x.shape[0]
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (3, 3, channels, self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        if self.implementation == "xla":
            y = jax.lax.conv_general_dilated(
                x, kernel, window_strides=(1, 1), padding="SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"))
            y = nn.relu(y + bias)
            return max_pool_2x2(y) if self.pool else y
        conv = conv_cpu.conv3x3_one_channel if channels == 1 else conv_cpu.conv3x3
        z = conv(x, kernel)
        if self.pool:
            return conv_cpu.bias_relu_max_pool(z, bias)
        return nn.relu(z + bias.reshape(-1, 1, 1, 1))


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """Take the max over each 2x2 window of NHWC `x` with stride 2 (height and width must be even)."""
    batch, height, width, channels = x.shape
    return x.reshape(batch, height // 2, 2, width // 2, 2, channels).max(axis=(2, 4))


class CNN(nn.Module):
    """Maps a batch of (28, 28, 1) images in [0, 1] to (batch, 10) logits."""

    width: int = 8
    conv: str = "xla"

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        # conv_cpu works on (C, H, W, N); the flatten below needs NHWC for both
        # implementations to share the dense layer's weights.
        chwn = self.conv == "matmul"
        x = images.transpose(3, 1, 2, 0) if chwn else images
        for _ in range(2):
            x = Conv3x3(self.width, self.conv)(x)
            x = Conv3x3(self.width, self.conv, pool=True)(x)
        if chwn:
            x = x.transpose(3, 1, 2, 0)
        return nn.Dense(10)(x.reshape(x.shape[0], -1))
