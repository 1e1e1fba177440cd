"""The Fashion-MNIST CNN of the PyTorch original, in Flax Linen.

Two blocks of (3x3 conv, ReLU, 3x3 conv, ReLU, 2x2 max-pool), then one dense
layer giving 10 logits. Every convolution has the same parameters whichever
implementation computes it, so a checkpoint restores under either.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
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


def build_model(width: int, conv: str) -> CNN:
    """Return the CNN for a config's `width` and `conv`, set up for the backend that runs it."""
    conv = resolve_conv(conv)
    # XLA's CPU runtime runs two half batches on two cores at once, which these small
    # matmuls do not manage alone. On 2 cores a step took about 0.85x the time of one.
    # NOTE: two slices were measured on 2 cores only. More cores may gain from more.
    # With several devices each one already has its own share of the batch.
    split = conv == "matmul" and jax.default_backend() == "cpu" and jax.device_count() == 1
    return CNN(width=width, conv=conv, batch_slices=2 if split else 1)


class CNN(nn.Module):
    """A CNN that maps a batch of (28, 28, 1) images in [0, 1] to (batch, 10) logits.

    `batch_slices` runs that many slices of the batch through the layers
    independently, with shared params, so that XLA may run them at the same time.
    The logits equal those of one slice up to float rounding.
    """

    width: int = 8
    conv: str = "xla"
    batch_slices: int = 1

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        if self.batch_slices < 1:
            raise ValueError(f"invalid batch_slices {self.batch_slices}: it must be at least 1")
        layers = [Conv3x3(self.width, self.conv, pool=index % 2 == 1) for index in range(4)]
        # Both dense layers have nn.Dense's params under the same name.
        dense = nn.Dense(10, name="Dense_0") if self.conv == "xla" else DenseCHWN(10, name="Dense_0")
        slices = min(self.batch_slices, images.shape[0])
        bounds = np.linspace(0, images.shape[0], slices + 1).astype(int)
        logits = []
        # Each slice reuses the same layer objects, so they share params.
        for start, stop in zip(bounds[:-1], bounds[1:]):
            x = images[start:stop]
            if self.conv == "matmul":
                x = x.transpose(3, 1, 2, 0)  # the (C, H, W, N) layout of conv_cpu
            for layer in layers:
                x = layer(x)
            logits.append(dense(x.reshape(x.shape[0], -1)) if self.conv == "xla" else dense(x))
        return logits[0] if len(logits) == 1 else jnp.concatenate(logits)


class DenseCHWN(nn.Module):
    """A layer equal to `nn.Dense` on the NHWC-flattened features of (C, H, W, N) input, with the same params.

    Permuting the rows of the small kernel costs less than transposing the activations.
    """

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels, height, width, batch = x.shape
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (height * width * channels, self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        chw_kernel = kernel.reshape(height, width, channels, self.features).transpose(2, 0, 1, 3)
        logits = jax.lax.dot_general(x.reshape(-1, batch), chw_kernel.reshape(-1, self.features),
                                     (((0,), (0,)), ((), ())))
        return logits + bias
