"""DP-SGD, Abadi et al. 2016, Alg. 1, with Poisson sampling: the one training step of every DP-SGD method.

    L      ~ Poisson sample: each of the N records independently with probability q      (PoissonSampler)
    g_i    = ∇θ ℓ(θ, x_i)                       for i in L                     (per-example gradients)
    ḡ_i    = g_i · min(1, C / (‖g_i‖ + 1e-6))   norm over ALL parameters jointly             (clipping)
    g̃      = (Σ_i ḡ_i + N(0, σ²C² I)) / (q·N)   the EXPECTED batch size, as the accountant assumes
    θ      ← optimizer.step(g̃)                  an empty batch still adds noise and takes the step

ℓ is given per example, `per_example_loss(model_call, *example) -> scalar`, so a method can fold noise
multiplicity (DPDM: the loss averages over K draws of (t, ε)) into it: per-example gradients are of the
K-averaged loss and B·K per-row gradients are never formed (except by opacus "hooks", see below).

How per-example gradients are computed (`mode`). Ratio = DP step ÷ non-private step (forward, backward
and Adam step on the mean loss over the same B·K rows) of the same UNet and batch, side by side in one
run of benchmarks/bench_dpsgd.py (min over rounds; four runs, 1 and 2 torch threads, 2 shared CPU
cores, torch 2.14.1, opacus 1.6.0; UNet base 8, mults (1, 2), 41k params, 1×28×28, batch 128):

    mode       K=1          K=4          how
    folded     0.82-0.95x   0.80-0.90x   one plain backward with the parameters frozen (activation
                                         gradients only); layer hooks turn activations and backprops
                                         into per-example gradients summed over the example's rows
                                         (conv weights: a grouped convolution_backward, groups = B;
                                         a 1×1 conv: a bmm; a 1-channel conv: a forward conv, _conv2d)
    functorch  0.67-0.77x   0.45-0.73x   torch.func vmap(grad(ℓ)); slow batching rules on CPU for the
                                         GroupNorm/SiLU backward and for thin (1-channel) convolutions
    hooks      0.45-0.68x   0.39-0.69x   opacus GradSampleModule: per-ROW gradients [B·K, P], summed
    ghost      0.34-0.56x   -            opacus ghost clipping: norms, then a second backward; opacus
                                         has no ghost norm for Conv2d, so convs still materialise
                                         per-sample gradients; per-row norms, so K = 1 only

The per-example gradients are tens of megabytes a step, allocated and freed every step: with glibc's default
malloc settings each step faults their pages in anew (11,605 minor faults a DP-GAN discriminator step, 467 for its
non-private step); `bench.allocator.keep_freed_memory()`, which `bench` calls before training, keeps them for reuse.

"auto" = "folded" when every trainable parameter belongs to a layer it knows (Conv2d, Linear, GroupNorm,
LayerNorm, Embedding), else "functorch"; it also falls back to "functorch" (with a warning) when the
loss or model does not fit the row-based modes. torch.compile of the functorch step: 134 s to compile
on 2 cores and no faster (0.65x), not used.

The row-based modes (folded, hooks, ghost) run the model outside vmap on all examples' rows at once:
per_example_loss runs under vmap once to collect the model inputs (outputs replaced by zeros, shapes
from a probe of example 0) and once on the real outputs. So it must be deterministic (vmap refuses
random ops there), every model input needs a leading row dimension, and the model must treat rows
independently (like opacus, these modes rely on it; it is checked: the outputs of example 0, of the last
example and of one drawn at random, each alone, must equal their outputs among all the others'). The
check runs at the first step of each engine (so of each fit and of each resumed attempt) and then every
ROW_CHECK_EVERY steps: row mixing is a property of the model's structure (batch statistics), which
opacus validates once, before training; the check's three extra single-example forwards cost 0.05x of
a DP-SAD student step on NCSN++ (benchmarks/bench_dpsad.py), too much to pay at every step.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap
from torch.nn.grad import conv2d_weight

from bench.privacy.ledger import Stage

PerExampleLoss = Callable[..., Tensor]  # (model_call, *example) -> scalar loss of ONE example
Clipped = tuple[list[Tensor], Tensor, Tensor, Tensor]  # Σ_i ḡ_i per parameter, norms [B], factors [B], losses [B]
# (outputs [b, R, ...] of the batch's examples `rows`, a slice of its B) -> (∂ℓ_i/∂out_i [b, R, ...], ℓ_i [b])
OutputGrad = Callable[[Tensor, slice], tuple[Tensor, Tensor]]
MODES = ("auto", "folded", "functorch", "hooks", "ghost")
_OPACUS_WARNING = "Full backward hook is firing"  # harmless: our model inputs never need gradients
_EPS = 1e-6  # clipping factor min(1, C / (‖g‖ + 1e-6)), as in opacus


@contextmanager
def _dropout_off(model: nn.Module) -> Iterator[None]:
    """The model's dropout layers in eval mode (identity) for the block, then as they were."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    modes = [m.training for m in layers]
    for m in layers:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(layers, modes, strict=True):
            m.train(mode)


# row-based forwards (one a step, or one a physical batch of it) between two checks that the model treats rows
# independently; the first forward of an engine is always checked
ROW_CHECK_EVERY = 25


class _NotRowwise(ValueError):
    """The loss or model does not fit a row-based mode (folded, hooks, ghost)."""


def _check_rate(q: float) -> float:
    if not (isinstance(q, int | float) and 0.0 < q <= 1.0):
        raise ValueError(f"sample_rate must be in (0, 1], got {q!r}")
    return float(q)


class PoissonSampler:
    """Poisson sampling: each record independently with probability q; yields int64 index tensors [B].

    B ~ Binomial(N, q); empty batches are yielded (each is still a noisy step). One pass yields
    round(1/q) batches. Each batch is the mask u < q of N uniforms u drawn in float64 from `generator` (a CPU
    generator). Not opacus' UniformWithReplacementSampler, which is the same rule in float32: a float32 u < q
    includes a record with probability ⌈q·2²⁴⌉/2²⁴ ≥ q (for q = 64/60000, 1.7e-5 of q above the q the
    ledger charges); in float64 the excess is below 2⁻⁵³, under the rounding of q itself.
    """

    def __init__(self, num_records: int, sample_rate: float, generator: torch.Generator) -> None:
        if not isinstance(num_records, int) or num_records < 1:
            raise ValueError(f"num_records must be an integer >= 1, got {num_records!r}")
        self.num_records, self.sample_rate = num_records, _check_rate(sample_rate)
        self.steps_per_epoch = max(1, round(1.0 / self.sample_rate))
        self.generator = generator

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[Tensor]:
        for _ in range(self.steps_per_epoch):
            u = torch.rand(self.num_records, generator=self.generator, dtype=torch.float64)
            yield (u < self.sample_rate).nonzero().reshape(-1)


@dataclass(frozen=True)
class StepStats:
    """Diagnostics of one step. Computed from private data without noise: for monitoring only."""

    batch_size: int  # realised Poisson batch size B
    loss: float  # mean per-example loss (nan when B = 0)
    clipped_fraction: float  # fraction of examples whose gradient was scaled down (nan when B = 0)
    grad_norm: float  # mean per-example gradient norm before clipping (nan when B = 0)


def per_example_norms(grads: Sequence[Tensor]) -> Tensor:
    """‖g_i‖ over all parameters jointly: tensors [B, *param.shape] -> float [B]."""
    return torch.stack([g.flatten(1).norm(dim=1) for g in grads], dim=1).norm(dim=1)


def clip_factors(norms: Tensor, max_grad_norm: float) -> Tensor:
    """min(1, C / (‖g_i‖ + 1e-6)): float [B] -> float [B] in (0, 1]."""
    return (max_grad_norm / (norms + _EPS)).clamp(max=1.0)


def add_noise(sums: Sequence[Tensor], *, noise_std: float, generator: torch.Generator) -> list[Tensor]:
    """Σ_i ḡ_i + N(0, noise_std²) on every coordinate, drawn from `generator` on each tensor's device."""
    if noise_std == 0.0:
        return list(sums)
    noise = [torch.randn(s.shape, generator=generator, device=s.device, dtype=s.dtype) for s in sums]
    torch._foreach_mul_(noise, noise_std)  # one kernel launch a list, not a tensor: the same values
    return list(torch._foreach_add(list(sums), noise))


# ------------------------------------------------------------- per-example gradients from hooks ("folded")
# Each takes a layer, its input a [R·B, ...] and output gradient g [R·B, ...], row r·B + b belonging to
# example b, and returns {parameter name: per-example gradient [B, *param.shape]} summed over the R rows.


def _conv2d(m: nn.Conv2d, a: Tensor, g: Tensor, B: int) -> dict[str, Tensor]:
    """Three exact forms of the same per-example weight gradient, the fastest for the layer's shape on a CPU
    (measured: benchmarks/bench_dpsad.py): a 1×1 convolution is a batched matrix product over positions; a layer
    with one input or one output channel is a forward convolution of the inputs with the output gradients as a
    depthwise kernel (stride and dilation swap roles); any other a grouped convolution, example b as group b."""
    R = a.shape[0] // B
    if m.groups == 1 and m.kernel_size == (1, 1) and m.stride == (1, 1) and m.padding == (0, 0):
        g_ = g.reshape(R, B, m.out_channels, -1).transpose(0, 1).transpose(2, 3).reshape(B, -1, m.out_channels)
        a_ = a.reshape(R, B, m.in_channels, -1).transpose(0, 1).transpose(2, 3).reshape(B, -1, m.in_channels)
        w = torch.bmm(g_.transpose(1, 2), a_)  # [B, out, in]: Σ over rows and positions
    elif m.groups == 1 and 1 in (m.in_channels, m.out_channels):
        w = _conv2d_by_forward(m, a, g, B, R)
    else:
        a_ = a.reshape(R, B * m.in_channels, *a.shape[2:])  # example b becomes channel group b: no copy
        g_ = g.reshape(R, B * m.out_channels, *g.shape[2:])
        size = (B * m.out_channels, *m.weight.shape[1:])
        w = conv2d_weight(a_, size, g_, m.stride, m.padding, m.dilation, B * m.groups)
    out = {"weight": w.view(B, *m.weight.shape)}
    if m.bias is not None:
        out["bias"] = g.reshape(R, B, m.out_channels, -1).sum((0, 3))
    return out


def _conv2d_by_forward(m: nn.Conv2d, a: Tensor, g: Tensor, B: int, R: int) -> Tensor:
    """∂ℓ_b/∂W[o, c, i, j] = Σ_{r,h,w} a_pad[r·B+b, c, s·h + d·i, s·w + d·j] · g[r·B+b, o, h, w]: a convolution whose
    batch is the input channels (and the rows), whose channels are the examples, with g as a depthwise kernel
    (B groups of `out` kernels), stride d and dilation s; the output is cropped to the kernel size."""
    (kh, kw), Ci, Co = m.kernel_size, m.in_channels, m.out_channels
    x = a.reshape(R, B, Ci, *a.shape[2:]).permute(0, 2, 1, 3, 4).reshape(R * Ci, B, *a.shape[2:])  # [R·C, B, H, W]
    k = g.reshape(R, B * Co, *g.shape[2:])
    w = torch.stack([F.conv2d(x[r * Ci : (r + 1) * Ci], k[r][:, None], stride=m.dilation, padding=m.padding,
                              dilation=m.stride, groups=B) for r in range(R)]).sum(0)  # fmt: skip
    return w[:, :, :kh, :kw].reshape(Ci, B, Co, kh, kw).permute(1, 2, 0, 3, 4)  # [B, Co, Ci, kh, kw]


def _linear(m: nn.Linear, a: Tensor, g: Tensor, B: int) -> dict[str, Tensor]:
    a_ = a.reshape(-1, B, math.prod(a.shape[1:-1]), a.shape[-1])  # [R, B, M, in]
    g_ = g.reshape(-1, B, math.prod(g.shape[1:-1]), g.shape[-1])
    out = {"weight": torch.einsum("rbmo,rbmi->boi", g_, a_)}
    if m.bias is not None:
        out["bias"] = g_.sum((0, 2))
    return out


def _group_norm(m: nn.GroupNorm, a: Tensor, g: Tensor, B: int) -> dict[str, Tensor]:
    x_hat = F.group_norm(a, m.num_groups, eps=m.eps)  # recomputed: cheaper than keeping it
    C = m.num_channels
    return {
        "weight": (x_hat * g).reshape(-1, B, C, math.prod(a.shape[2:])).sum((0, 3)),
        "bias": g.reshape(-1, B, C, math.prod(a.shape[2:])).sum((0, 3)),
    }


def _layer_norm(m: nn.LayerNorm, a: Tensor, g: Tensor, B: int) -> dict[str, Tensor]:
    x_hat = F.layer_norm(a, m.normalized_shape, eps=m.eps)
    shape = (-1, B, math.prod(a.shape[1 : a.dim() - len(m.normalized_shape)]), *m.normalized_shape)
    return {"weight": (x_hat * g).reshape(shape).sum((0, 2)), "bias": g.reshape(shape).sum((0, 2))}


def _embedding(m: nn.Embedding, a: Tensor, g: Tensor, B: int) -> dict[str, Tensor]:
    V, D = m.num_embeddings, m.embedding_dim
    idx = a.reshape(-1, B, math.prod(a.shape[1:]))  # [R, B, M]
    g_ = g.reshape(idx.shape + (D,))
    if m.padding_idx is not None:
        g_ = g_ * (idx != m.padding_idx).unsqueeze(-1)
    row = (torch.arange(B, device=a.device).view(1, B, 1) * V + idx).reshape(-1)
    w = torch.zeros(B * V, D, device=g.device, dtype=g.dtype).index_add_(0, row, g_.reshape(-1, D))
    return {"weight": w.view(B, V, D)}


_FOLDED: dict[type, Callable[[Any, Tensor, Tensor, int], dict[str, Tensor]]] = {
    nn.Conv2d: _conv2d,
    nn.Linear: _linear,
    nn.GroupNorm: _group_norm,
    nn.LayerNorm: _layer_norm,
    nn.Embedding: _embedding,
}


def _folded_supports(m: nn.Module) -> bool:
    if type(m) is nn.Conv2d:
        return m.padding_mode == "zeros" and not isinstance(m.padding, str)
    if type(m) is nn.Embedding:
        return m.max_norm is None and not m.sparse
    return type(m) in _FOLDED


@contextmanager
def _frozen(params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Parameters out of autograd: the plain backward then computes activation gradients only."""
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


def output_surrogate(model_call: Callable[..., Tensor], *example: Tensor) -> Tensor:
    """⟨model(inputs), o⟩ of ONE example: `example` = (*model inputs [R, ...], o [R, ...]). With o = ∂ℓ/∂out held
    fixed, its parameter gradient is exactly ∇θ ℓ (chain rule): the per-example loss of `DPSGD.step_outputs`."""
    *inputs, o = example
    return (model_call(*inputs) * o).sum()


def poisson_stream(num_records: int, sample_rate: float, generator: torch.Generator) -> Iterator[Tensor]:
    """An endless stream of Poisson batches (index tensors); each draw depends only on the generator's state,
    so a fit resumed with the generator's saved state continues the same stream."""
    return (idx for _ in itertools.count() for idx in PoissonSampler(num_records, sample_rate, generator))


class ChargedSteps:
    """A Poisson-subsampled Gaussian mechanism that counts its steps as it runs, so that the stage it
    charges is the one executed. Subclasses set the attributes below and add 1 to `steps` per noisy step."""

    noise_multiplier: float
    sample_rate: float
    max_grad_norm: float
    expected_batch_size: float
    steps: int

    def stage(self, name: str) -> Stage:
        """The poisson_gaussian stage actually executed so far (σ > 0 and at least one step)."""
        return Stage(
            name=name,
            mechanism="poisson_gaussian",
            noise_multiplier=self.noise_multiplier,
            sampling_rate=self.sample_rate,
            steps=self.steps,
            max_grad_norm=self.max_grad_norm,
            expected_batch_size=self.expected_batch_size,
        )

    def state_dict(self) -> dict[str, Any]:
        """The step counter (model and optimizer are checkpointed by the caller)."""
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        steps = state.get("steps")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"state['steps'] must be an integer >= 0, got {steps!r}")
        self.steps = steps


class DPSGD(ChargedSteps):
    """One DP-SGD step (module docstring) on `model` with `optimizer`; counts the noisy steps taken.

    `per_example_loss(model_call, *example)` returns the scalar loss of ONE example: `example` are the
    batch tensors at one index (leading dim removed), `model_call(*inputs)` runs the model. All of the
    loss's randomness (timesteps, noise) is drawn by the caller and passed in as batch tensors.
    `generator` draws the Gaussian noise, on the parameters' device. Per-example gradients take B × P
    floats (all modes but ghost); `max_physical_batch_size` bounds B per backward without changing
    the step (the clipped sum is accumulated over chunks, the noise added once).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        per_example_loss: PerExampleLoss,
        noise_multiplier: float,
        max_grad_norm: float,
        sample_rate: float,
        num_records: int,
        generator: torch.Generator,
        mode: str = "auto",
        max_physical_batch_size: int | None = None,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        if not (isinstance(noise_multiplier, int | float) and 0.0 <= noise_multiplier < math.inf):
            raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
        if not (isinstance(max_grad_norm, int | float) and max_grad_norm > 0.0):
            raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm!r}")
        if math.isinf(max_grad_norm) and noise_multiplier > 0:
            raise ValueError("max_grad_norm = inf (no clipping) is only meaningful with noise_multiplier = 0")
        if not isinstance(num_records, int) or num_records < 1:
            raise ValueError(f"num_records must be an integer >= 1, got {num_records!r}")
        if max_physical_batch_size is not None and max_physical_batch_size < 1:
            raise ValueError(f"max_physical_batch_size must be >= 1 or None, got {max_physical_batch_size!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if autocast_dtype is not None and mode in ("hooks", "ghost"):
            raise ValueError(f"autocast runs with modes 'folded' and 'functorch' only, not {mode!r}")
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            raise ValueError("BatchNorm mixes the examples of a batch; use GroupNorm (docs/privacy.md rule 8)")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("model has no trainable parameters")
        self.model, self.optimizer, self.per_example_loss = model, optimizer, per_example_loss
        self.noise_multiplier, self.max_grad_norm = float(noise_multiplier), float(max_grad_norm)
        self.sample_rate, self.num_records = _check_rate(sample_rate), num_records
        self.expected_batch_size = self.sample_rate * num_records  # q·N: the divisor, whatever B is
        self.generator = generator
        self.max_physical_batch_size = max_physical_batch_size  # examples per backward; None: all at once
        # mixed precision for the model's forward and backward only: per-example gradients (the folded hooks cast
        # activations and backprops to float32), their norms, the clipping and the noise stay float32
        self.autocast_dtype = autocast_dtype
        self._names, self.params = [n for n, _ in named], [p for _, p in named]
        if generator.device.type != self.params[0].device.type:
            raise ValueError(f"generator is on {generator.device}, parameters on {self.params[0].device}")
        self.steps = 0  # noisy steps actually taken

        # layer -> [(parameter name, index in self.params)] for the row-based modes
        index = {id(p): i for i, p in enumerate(self.params)}
        self._layers = {
            m: [(n, index[id(p)]) for n, p in m.named_parameters(recurse=False) if id(p) in index]
            for m in model.modules()
        }
        self._layers = {m: owned for m, owned in self._layers.items() if owned}
        folded_ok = all(_folded_supports(m) for m in self._layers)
        if mode == "folded" and not folded_ok:
            bad = sorted({type(m).__name__ for m in self._layers if not _folded_supports(m)})
            raise ValueError(f"mode 'folded' does not support layers {bad}; use mode='functorch'")
        self._auto = mode == "auto"
        self.mode = ("folded" if folded_ok else "functorch") if self._auto else mode
        # dropout makes the outputs of the same rows differ from call to call
        self._random_model = any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())
        # which example besides 0 and the last the row check compares at each call: its own stream, so that the
        # run's generators (and results) do not depend on the check
        self._probe_rng = random.Random(0)
        self._row_calls = 0  # row-based forwards so far: the check runs at the first and every ROW_CHECK_EVERY-th
        self._gsm: GradSampleModule | GradSampleModuleFastGradientClipping | None = None
        if self.mode == "hooks":
            self._gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True)
        elif self.mode == "ghost":
            C = self.max_grad_norm if math.isfinite(self.max_grad_norm) else 1.0  # its own coef is unused
            self._gsm = GradSampleModuleFastGradientClipping(
                model, batch_first=True, loss_reduction="sum", max_grad_norm=C, use_ghost_clipping=True
            )
        if self._gsm is not None:
            self._gsm.disable_hooks()  # on only inside step(): other forwards must not record activations

    # ------------------------------------------------------------------------------------------ the step

    def step(self, *batch: Tensor) -> StepStats:
        """One noisy step on a Poisson batch: tensors with leading dim B (B may be 0)."""
        return self._release(self._batch_size(batch), lambda: self._clipped_sum(*batch))

    def step_outputs(self, inputs: Sequence[Tensor], output_grad: OutputGrad) -> tuple[StepStats, Tensor]:
        """One noisy step on a Poisson batch for a loss whose gradient with respect to the model's outputs is given:
        `inputs` [B, R, ...] (R rows per example, the model's positional inputs), `output_grad(out, rows)` maps the
        model's outputs out [b, R, ...] (float32, no graph) of the examples `rows` (a slice of the B: physical
        batches come in chunks) to (o [b, R, ...], losses [b]) with o_i = ∂ℓ_i/∂out_i, a function of example i's
        rows only. The per-example gradient is g_i = J_iᵀ o_i, clipped and noised as in
        `step`. Mode "folded" runs the model ONCE (one forward, one backward: the outputs come from the graph the
        per-example gradients are taken on); the other modes run it once without a graph and then take the
        per-example gradients of ⟨model(inputs_i), o_i⟩, so `per_example_loss` must be `output_surrogate`.
        Returns the step's statistics and the outputs [B, R, ...] before the step (no graph)."""
        B = self._batch_size(inputs)
        if self.per_example_loss is not output_surrogate:
            raise ValueError("step_outputs needs per_example_loss=output_surrogate (its fallback for other modes)")
        outs: list[Tensor] = []
        if self.mode == "folded" and B > 0:
            try:
                stats = self._release(B, lambda: self._chunked(inputs, B, self._folded_outputs(output_grad, outs)))
                return stats, torch.cat(outs)
            except _NotRowwise as e:
                if not self._auto:
                    raise
                warnings.warn(f"{e}: mode 'auto' switches from 'folded' to 'functorch'", stacklevel=2)
                self.mode = "functorch"
        with torch.no_grad():
            out = self._rows_call(inputs, B) if B > 0 else torch.zeros(0, device=self.params[0].device)
        o, _ = output_grad(out, slice(0, B)) if B > 0 else (out, None)
        return self.step(*inputs, o), out

    def _release(self, B: int, clipped_sum: Callable[[], Clipped]) -> StepStats:
        """Clip (by `clipped_sum`: Σ_i ḡ_i, norms, factors, losses), check, add N(0, σ²C²), divide by q·N, step."""
        C, sigma = self.max_grad_norm, self.noise_multiplier
        try:
            sums, norms, factors, losses = clipped_sum()
            if B > 0:
                checks = torch.stack(
                    [losses.mean(), (factors < 1).float().mean(), norms.mean(), (norms * factors).max()]
                )
                loss, clipped, norm, largest = checks.tolist()
                if not math.isfinite(norm):
                    raise RuntimeError("non-finite per-example gradient; refusing to release this step")
                if largest > C * (1 + 1e-5):  # a privacy invariant: raise, never assert
                    raise RuntimeError(f"clipped per-example gradient norm {largest} exceeds C = {C}")
            else:
                loss = clipped = norm = math.nan
            noisy = add_noise(sums, noise_std=sigma * C if sigma > 0 else 0.0, generator=self.generator)
            for p, g in zip(self.params, torch._foreach_div(noisy, self.expected_batch_size), strict=True):
                p.grad = g
        except BaseException:
            for p in self.params:
                p.grad = None  # never leave an un-noised gradient behind
            raise
        self.optimizer.step()
        self.steps += 1
        return StepStats(batch_size=B, loss=loss, clipped_fraction=clipped, grad_norm=norm)

    def _batch_size(self, batch: Sequence[Tensor]) -> int:
        if not batch or any(not isinstance(b, Tensor) or b.dim() == 0 for b in batch):
            raise ValueError("step() needs at least one tensor, each with a leading batch dimension")
        B = batch[0].shape[0]
        if any(b.shape[0] != B for b in batch):
            raise ValueError(f"batch tensors disagree on the batch size: {[tuple(b.shape) for b in batch]}")
        return B

    def _clipped_sum(self, *batch: Tensor) -> Clipped:
        """Σ_i ḡ_i (no noise: internal, never release), norms ‖g_i‖ [B], factors [B], losses [B]."""
        B = self._batch_size(batch)
        if B == 0:
            empty = torch.zeros(0, device=self.params[0].device)
            return [torch.zeros_like(p) for p in self.params], empty, empty, empty
        if self.mode == "ghost":
            return self._chunked(batch, B, lambda chunk: self._ghost(chunk, len(chunk[0])))

        def clip(chunk: Sequence[Tensor]) -> Clipped:
            with self._autocast():
                grads, losses = self._per_example_grads(*chunk)
            return self._clip(grads, losses)

        return self._chunked(batch, B, clip)

    def _chunked(self, batch: Sequence[Tensor], B: int, clip: Callable[[Sequence[Tensor]], Clipped]) -> Clipped:
        """`clip` on chunks of at most max_physical_batch_size examples: the clipped sum is additive over examples,
        so memory is bounded and the result the same."""
        chunk = self.max_physical_batch_size or B
        parts = [clip([b[i : i + chunk] for b in batch]) for i in range(0, B, chunk)]
        if len(parts) == 1:
            return parts[0]
        sums = [torch.stack(s).sum(0) for s in zip(*(part[0] for part in parts), strict=True)]
        norms, factors = torch.cat([part[1] for part in parts]), torch.cat([part[2] for part in parts])
        return sums, norms, factors, torch.cat([part[3] for part in parts])

    def _clip(self, grads: list[Tensor], losses: Tensor) -> Clipped:
        """Per-example gradients [B, *p.shape] -> (Σ_i ḡ_i, norms, factors, losses)."""
        grads = [g.float() for g in grads]
        norms = per_example_norms(grads)
        factors = clip_factors(norms, self.max_grad_norm)
        sums = [torch.tensordot(factors.to(g.dtype), g, dims=1) for g in grads]
        return sums, norms, factors, losses

    def _autocast(self) -> Any:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.params[0].device.type, dtype=self.autocast_dtype)

    def _per_example_grads(self, *batch: Tensor) -> tuple[list[Tensor], Tensor]:
        """Per-example gradients [B, *p.shape] for each trainable parameter, and losses [B]. Internal."""
        B = self._batch_size(batch)
        if self.mode == "folded":
            try:
                return self._folded(batch, B)
            except _NotRowwise as e:
                if not self._auto:
                    raise
                warnings.warn(f"{e}: mode 'auto' switches from 'folded' to 'functorch'", stacklevel=3)
                self.mode = "functorch"
        if self.mode == "functorch":
            return self._functorch(batch)
        if self.mode == "hooks":
            return self._hooks(batch, B)
        raise ValueError(f"mode {self.mode!r} computes norms, never per-example gradients")

    # ------------------------------------------------------------------------------------------ the modes

    def _functorch(self, batch: Sequence[Tensor]) -> tuple[list[Tensor], Tensor]:
        params = {n: p.detach() for n, p in zip(self._names, self.params, strict=True)}
        rest: dict[str, Tensor] = {n: t for n, t in self.model.named_parameters() if n not in params}
        rest.update(self.model.named_buffers())

        def loss(params: dict[str, Tensor], *example: Tensor) -> Tensor:
            return self.per_example_loss(lambda *x: functional_call(self.model, (params, rest), x), *example)

        in_dims = (None, *(0,) * len(batch))
        grads, losses = vmap(grad_and_value(loss), in_dims=in_dims, randomness="different")(params, *batch)
        return [grads[n] for n in self._names], losses

    @contextmanager
    def _folded_hooks(self, B: int) -> Iterator[dict[int, Tensor]]:
        """Parameters frozen and layer hooks on: a backward inside the block adds each layer's per-example
        gradients (summed over the example's rows) into the yielded {parameter index: [B, *p.shape]}."""
        acc: dict[int, Tensor] = {}

        def forward_hook(m: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> Tensor | None:
            if not torch.is_grad_enabled():  # the shape probe
                return None
            a = inputs[0].detach()
            if not out.requires_grad:  # nothing upstream needs gradients: start the graph here
                out = out.detach().requires_grad_().clone()  # not a leaf: later in-place ops allowed

            def backward_hook(g: Tensor) -> None:
                acts = a.float() if a.is_floating_point() else a  # float32 under autocast; indices stay integers
                with torch.autocast(acts.device.type, enabled=False):  # the per-example gradients in float32
                    per_example = _FOLDED[type(m)](m, acts, g.detach().float(), B)
                for name, i in self._layers[m]:
                    acc[i] = acc[i] + per_example[name] if i in acc else per_example[name]

            out.register_hook(backward_hook)
            return out

        with _frozen(self.params):
            handles = [m.register_forward_hook(forward_hook) for m in self._layers]
            try:
                yield acc
            finally:
                for h in handles:
                    h.remove()

    def _folded(self, batch: Sequence[Tensor], B: int) -> tuple[list[Tensor], Tensor]:
        with self._folded_hooks(B) as acc:
            losses = self._rows_forward(batch, B)
            if losses.requires_grad:
                losses.sum().backward()
        grads = [acc[i] if i in acc else p.new_zeros(B, *p.shape) for i, p in enumerate(self.params)]
        return grads, losses.detach()

    def _rows_call(self, inputs: Sequence[Tensor], B: int) -> Tensor:
        """The model on every example's rows at once: inputs [B, R, ...] -> outputs [B, R, ...]."""
        R = inputs[0].shape[1]
        out = self.model(*(x.transpose(0, 1).reshape(R * B, *x.shape[2:]) for x in inputs))  # row r·B + b
        return out.reshape(R, B, *out.shape[1:]).transpose(0, 1)

    def _folded_outputs(self, output_grad: OutputGrad, outs: list[Tensor]) -> Callable[[Sequence[Tensor]], Clipped]:
        """step_outputs' clip of one chunk in mode "folded": one forward with the layer hooks, o from
        `output_grad`, one backward of the outputs with gradient o; the outputs (no graph) go to `outs`."""

        def clip(inputs: Sequence[Tensor]) -> Clipped:
            B, R = inputs[0].shape[0], inputs[0].shape[1]
            if any(x.dim() < 2 or x.shape[1] != R for x in inputs):
                raise _NotRowwise("step_outputs needs inputs [B, R, ...] with one common row dimension")
            if check := self._row_check_due():
                with torch.no_grad(), self._autocast():  # example 0 alone: the rows must not mix (a privacy check)
                    alone = self.model(*(x[0] for x in inputs))
            with self._folded_hooks(B) as acc:
                with self._autocast():
                    out = self._rows_call(inputs, B)
                if check:
                    self._check_rowwise(list(inputs), out.detach(), alone, "step_outputs needs")
                start = sum(len(done) for done in outs)  # the chunks come in order
                o, losses = output_grad(out.detach().float(), slice(start, start + B))
                if o.shape != out.shape:
                    raise ValueError(f"output_grad returned {tuple(o.shape)}, the outputs are {tuple(out.shape)}")
                out.backward(o.to(out.dtype))
            outs.append(out.detach().float())
            grads = [acc[i] if i in acc else p.new_zeros(B, *p.shape) for i, p in enumerate(self.params)]
            return self._clip(grads, losses.detach())

        return clip

    def _hooks(self, batch: Sequence[Tensor], B: int) -> tuple[list[Tensor], Tensor]:
        losses = self._opacus_backward(batch, B, rows=None)
        grads = []
        for n, p in zip(self._names, self.params, strict=True):
            gs = getattr(p, "grad_sample", None)
            if not isinstance(gs, Tensor) or gs.shape[0] % B:
                raise RuntimeError(f"opacus gave no per-sample gradient for {n} (model in eval mode?)")
            grads.append(gs.reshape(-1, B, *p.shape).sum(0))  # rows r·B + b -> example b
            p.grad_sample, p.grad = None, None  # type: ignore[attr-defined]
        return grads, losses.detach()

    def _ghost(self, batch: Sequence[Tensor], B: int) -> Clipped:
        losses = self._opacus_backward(batch, B, rows=1, retain_graph=True)
        norms = self._opacus().get_norm_sample()
        if norms.shape != (B,):
            raise RuntimeError(f"opacus ghost norms have shape {tuple(norms.shape)}, expected ({B},)")
        factors = clip_factors(norms, self.max_grad_norm)
        for p in self.params:
            p.grad, p._norm_sample = None, None  # type: ignore[attr-defined]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_OPACUS_WARNING)
            (factors.detach() * losses).sum().backward()  # hooks off: Σ_i c_i ∇ℓ_i = Σ_i ḡ_i
        sums = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        for p in self.params:
            p.grad = None
        return sums, norms, factors, losses.detach()

    def _opacus(self) -> GradSampleModule | GradSampleModuleFastGradientClipping:
        if self._gsm is None:
            raise RuntimeError(f"mode {self.mode!r} has no opacus module")
        return self._gsm

    def _opacus_backward(self, batch: Sequence[Tensor], B: int, rows: int | None, retain_graph: bool = False) -> Tensor:
        """Per-example losses [B] after one backward with opacus' hooks on."""
        gsm = self._opacus()
        for p in self.params:
            p.grad, p.grad_sample = None, None  # type: ignore[attr-defined]
        gsm.enable_hooks()
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_OPACUS_WARNING)
                losses = self._rows_forward(batch, B, single_call=True, rows=rows)
                losses.sum().backward(retain_graph=retain_graph)
        except BaseException:
            for m in self.model.modules():  # activations of a forward without backward: drop them
                for attr in ("activations", "max_batch_len"):
                    if hasattr(m, attr):
                        delattr(m, attr)
            raise
        finally:
            gsm.disable_hooks()
        return losses

    def _row_check_due(self) -> bool:
        """Whether this row-based forward checks that the rows do not mix: the first, then every ROW_CHECK_EVERY-th."""
        self._row_calls += 1
        return (self._row_calls - 1) % ROW_CHECK_EVERY == 0

    def _check_rowwise(self, inputs: list[Tensor], out: Tensor, alone: Tensor, how: str) -> None:
        """Privacy: an example's rows must give the same model outputs alone as among all the others' (`out`
        [B, R, ...], the batched call); a model that mixes rows (batch statistics) would let one example's gradient
        depend on another's. Checked for example 0 (`alone`: its outputs computed beforehand), the last example and
        one drawn at random at each check, so that a model that leaves some example untouched is still caught. A
        model with dropout is compared with its dropout off, each example alone and among the first 4 (extra
        forwards without gradients). Tolerance: 1e-4 of the largest output in float32 (batched and single
        convolutions differ by rounding only), 2e-2 under bf16 autocast."""
        B = inputs[0].shape[0]
        others = sorted({self._probe_rng.randrange(1, B), B - 1}) if B > 1 else []
        for i in (0, *others):
            if i == 0 and not self._random_model:
                together, single = out[0], alone
            else:
                with torch.no_grad(), self._autocast():
                    single, together = self._alone_and_among(inputs, out, i)
            rel = 2e-2 if self.autocast_dtype is not None else 1e-4
            if (together - single).abs().max() > rel * single.abs().max() + 1e-6:
                raise _NotRowwise(f"{how} a model that treats rows independently; this one mixes them")

    def _alone_and_among(self, inputs: list[Tensor], out: Tensor, i: int) -> tuple[Tensor, Tensor]:
        """Example i's model outputs alone, and among the others: from `out`, or for a model with dropout, both with
        the dropout off, among the first 4 examples and i."""
        if not self._random_model:
            return self.model(*(x[i] for x in inputs)), out[i].detach()
        idx = sorted({*range(min(len(inputs[0]), 4)), i})
        R = inputs[0].shape[1]
        with _dropout_off(self.model):
            single = self.model(*(x[i] for x in inputs))
            some = self.model(*(x[idx].transpose(0, 1).reshape(R * len(idx), *x.shape[2:]) for x in inputs))
        return single, some.reshape(R, len(idx), *some.shape[1:])[:, idx.index(i)]

    def _rows_forward(
        self, batch: Sequence[Tensor], B: int, *, single_call: bool = False, rows: int | None = None
    ) -> Tensor:
        """Per-example losses [B], the model run on all examples' rows at once, outside vmap."""
        probe: list[Tensor] = []  # the model outputs of example 0 alone: shapes, and a reference

        def probe_call(*inputs: Tensor) -> Tensor:
            probe.append(self.model(*inputs))
            return probe[-1]

        with torch.no_grad():
            self.per_example_loss(probe_call, *(b[0] for b in batch))
        how = f"mode {self.mode!r} needs"
        if single_call and len(probe) != 1:
            raise _NotRowwise(f"{how} per_example_loss to call the model once, not {len(probe)} times")

        def capture(*example: Tensor) -> list[list[Tensor]]:
            calls: list[list[Tensor]] = []

            def call(*inputs: Tensor) -> Tensor:
                if len(calls) >= len(probe) or not all(isinstance(x, Tensor) and x.dim() > 0 for x in inputs):
                    raise _NotRowwise(f"{how} model inputs that are tensors with a leading row dimension")
                calls.append(list(inputs))
                return torch.zeros_like(probe[len(calls) - 1])

            self.per_example_loss(call, *example)
            return calls

        outs, check = [], self._row_check_due()
        for inputs, reference in zip(vmap(capture)(*batch), probe, strict=True):  # inputs [B, R, ...]
            R = inputs[0].shape[1]
            if any(x.shape[1] != R for x in inputs):
                raise _NotRowwise(f"{how} model inputs with one common leading row dimension")
            if rows is not None and rows != R:
                raise _NotRowwise(f"{how} {rows} row per example (it clips per-row norms), got {R}")
            out = self.model(*(x.transpose(0, 1).reshape(R * B, *x.shape[2:]) for x in inputs))
            if not isinstance(out, Tensor) or out.shape[0] != R * B:
                raise _NotRowwise(f"{how} a model output that is a tensor with {R * B} rows")
            out = out.reshape(R, B, *out.shape[1:]).transpose(0, 1)  # row r·B + b -> [b, r]
            if check:
                self._check_rowwise(inputs, out, reference, how)
            outs.append(out)

        def loss(outs: list[Tensor], *example: Tensor) -> Tensor:
            it = iter(outs)
            return self.per_example_loss(lambda *_: next(it), *example)

        losses = vmap(loss)(outs, *batch)  # randomness="error": the loss must be deterministic
        if losses.shape != (B,):
            raise ValueError(f"per_example_loss must return a scalar, got shape {tuple(losses.shape[1:])}")
        return losses
