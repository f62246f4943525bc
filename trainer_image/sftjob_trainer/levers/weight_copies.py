"""Linear layers compute with bf16 copies of their weights, made once per optimizer step.

The mechanics of the castWeightsOncePerStep lever (cast_weights_once.py; and of
fuseGradientAccumulation, below). Under bf16 autocast with fp32 weights, every
linear layer casts its weight and bias to bf16 at every micro-step, and its backward casts
the bf16 weight gradient back to fp32 before autograd adds it into `.grad`. The weights
only change at the optimizer step, so with N micro-steps per step the same casts are made
N times. Here each plain `nn.Linear` with fp32 weights keeps a bf16 copy of its weight and
bias (non-persistent buffers, so checkpoints and the state dict do not change) and
computes with them; the copies are made again at the start of training (after a
checkpoint has loaded) and after every optimizer step. A hook adds each copy's bf16
gradient into the fp32 parameter's `.grad`, in fp32. When training ends the layers become
plain `nn.Linear` again, so whatever runs after (a LoRA merge, a forward outside
autocast) sees ordinary layers.

The arithmetic is the same as autocast's: a copy rounds the fp32 weight to bf16 as
autocast's cast does, the layer then runs the same bf16 matmul, and adding a bf16
gradient into an fp32 `.grad` promotes it to fp32 first, as the cast back did. The
optimizer, gradient clipping and checkpoints see only the fp32 parameters.

Not for FSDP, DeepSpeed or several processes: they take the gradients autograd puts on the
parameters themselves, and these arrive through the hook instead (cast_weights_once.py
turns the lever off there, and `use_weight_copies` refuses a trainer set up for them). Not
for the LM head either: TRL's and the lean LM head read its weight directly.

With `accumulate_in_matmul` (the fuseGradientAccumulation lever) a trainable layer's
backward adds its weight gradient straight into the fp32 `.grad`, inside the matmul that
computes it: on CUDA one cuBLAS call with bf16 inputs, fp32 output and beta 1
(`torch.addmm(..., out_dtype=torch.float32, out=grad)`), as Megatron-LM's gradient
accumulation fusion does. The bf16 weight gradient is never written, read back and
added by a separate kernel (about 3% of the kernel time in session 7's profile). It is
not bit for bit autocast's arithmetic: the product is kept in fp32 instead of rounded to
bf16 before the add (measured against float64, the gradients' errors are the same size
as autocast's, set by the bf16 activations). Each such layer keeps an fp32 buffer per
parameter (shared by layers that share the parameter) that IS that parameter's `.grad`
while training runs: handed over, zeroed, at train begin and after each step's
`zero_grad`; before each optimizer step a parameter whose sum stayed zero (no backward
reached it) or that was frozen meanwhile goes back to `.grad` None, so the optimizer
skips it as it skips plain autograd's None. Where the fp32-output matmul is not there
(CPU, an older torch), the same path multiplies in bf16 and adds, which is autocast's
arithmetic again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .fp8_linear import LinearInFp8, add_fp8_copies, drop_fp8_copies, fits_fp8, refresh_fp8_copies
from .training_hooks import found_module

log = logging.getLogger("sftjob_trainer.weight_copies")

COPY_DTYPE = torch.bfloat16
SLOTS = ("weight", "bias")


class LinearWithWeightCopies(nn.Linear):
    """An nn.Linear that multiplies by its bf16 copies (`weight_copy`, `bias_copy`)."""

    weight_copy: torch.Tensor
    bias_copy: torch.Tensor | None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.weight_copy, self.bias_copy)


class LinearAccumulatingInMatmul(LinearWithWeightCopies):
    """Weight copies whose backward adds the weight gradient into `.grad` in the matmul.

    `weight_grad_sum` and `bias_grad_sum` (None without a bias) are fp32 buffers that the
    parameters hold as `.grad` while training runs; layers that share a weight share its
    sum.
    """

    weight_grad_sum: torch.Tensor
    bias_grad_sum: torch.Tensor | None
    # True where the product is added in fp32 (on CUDA inside the matmul, checked by
    # `matmul_adds_in_fp32` when the lever is applied); else bf16 product, then add.
    fp32_products: bool

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _LinearAccumulating.apply(
            input,
            self.weight_copy,
            self.bias_copy,
            self.weight_grad_sum,
            self.bias_grad_sum,
            self.fp32_products,
        )


def add_fp32_product(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """total += a @ b, the bf16 product kept in fp32: on CUDA in cuBLAS's epilogue (fp32
    output, beta 1), with no bf16 result written; elsewhere by an fp32 matmul."""
    if total.is_cuda:
        torch.addmm(total, a, b, out_dtype=torch.float32, out=total)
    else:
        total.addmm_(a.float(), b.float())


@torch.library.custom_op("sftjob::accumulate_linear_grads", mutates_args=("weight_sum", "bias_sum"))
def accumulate_linear_grads(
    weight_sum: torch.Tensor,
    bias_sum: torch.Tensor | None,
    grad_output: torch.Tensor,
    input: torch.Tensor,
    fp32_products: bool,
) -> None:
    """weight_sum += grad_output^T @ input, bias_sum += its column sums (fp32 sums).

    A custom op that declares what it mutates: under torch.compile it stays one opaque
    call inside the compiled backward, writing into the buffers in place (a plain
    in-place add in an autograd.Function's backward would not be traced that way).
    """
    grad_2d = grad_output.reshape(-1, grad_output.shape[-1])
    input_2d = input.reshape(-1, input.shape[-1])
    if fp32_products:
        add_fp32_product(weight_sum, grad_2d.t(), input_2d)
        if bias_sum is not None:
            bias_sum.add_(grad_2d.sum(0, dtype=torch.float32))
    else:  # autocast's arithmetic: the bf16 product (and bf16 sum), added in fp32
        weight_sum.add_(grad_2d.t().mm(input_2d))
        if bias_sum is not None:
            bias_sum.add_(grad_2d.sum(0))


@accumulate_linear_grads.register_fake
def _(weight_sum: Any, bias_sum: Any, grad_output: Any, input: Any, fp32_products: bool) -> None:
    return None


class _LinearAccumulating(torch.autograd.Function):
    """F.linear with the bf16 copies; the backward accumulates the fp32 gradient sums.

    The input is cast to the copies' dtype as autocast would; the gradient for the input
    goes back in the input's own dtype. The copies get no gradient (it is in the sums).
    The sums ride on `ctx`, not among the saved tensors: saved tensors may be packed away
    and handed back as new tensors (saved-tensor hooks, activation offloading), and they
    carry a version check that a layer used twice (called twice, or two layers sharing
    a weight) fails once the first backward has added into the sum, also when the two
    uses are in different compiled graphs.
    """

    @staticmethod
    def forward(
        ctx: Any,
        input: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        weight_sum: torch.Tensor,
        bias_sum: torch.Tensor | None,
        fp32_products: bool,
    ) -> torch.Tensor:
        rounded = input.to(weight.dtype)
        ctx.save_for_backward(rounded, weight)
        ctx.sums = (weight_sum, bias_sum)
        ctx.input_dtype = input.dtype
        ctx.fp32_products = fp32_products
        return F.linear(rounded, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        rounded, weight = ctx.saved_tensors
        weight_sum, bias_sum = ctx.sums
        torch.ops.sftjob.accumulate_linear_grads(
            weight_sum, bias_sum, grad_output, rounded, ctx.fp32_products
        )
        grad_input = grad_output.matmul(weight).to(ctx.input_dtype)
        return grad_input, None, None, None, None, None


@dataclass
class GradSum:
    """One fp32 parameter's gradient sum: the buffer `<slot>_grad_sum` of each fused layer
    that uses the parameter (one tensor, shared when layers share the parameter)."""

    name: str
    parameter: nn.Parameter
    places: list[tuple[nn.Module, str]]  # fused bf16 layers and trainable fp8 layers

    @property
    def total(self) -> torch.Tensor:
        module, slot = self.places[0]
        return module._buffers[f"{slot}_grad_sum"]  # type: ignore[return-value]

    def share(self) -> None:
        """One tensor in every place again (a `.to()` gives each module its own)."""
        total = self.total
        for module, slot in self.places[1:]:
            module._buffers[f"{slot}_grad_sum"] = total


def matmul_adds_in_fp32(device: torch.device) -> str | None:
    """Whether torch.addmm accumulates a bf16 product into an fp32 tensor in place on
    this device, checked against float64 on a small product; None if it does, else why."""
    if device.type != "cuda":
        return f"no fp32-output matmul on {device.type}"
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(256, 192, device=device, generator=generator).to(torch.bfloat16)
    b = torch.randn(192, 128, device=device, generator=generator).to(torch.bfloat16)
    total = torch.randn(256, 128, device=device, generator=generator)
    expected = total.double() + a.double() @ b.double()
    try:
        add_fp32_product(total, a, b)
    except (RuntimeError, TypeError) as error:  # torch without out_dtype, or no kernel
        return f"torch.addmm with out_dtype=float32 failed: {error}"
    error = ((total.double() - expected).abs().max() / expected.abs().max()).item()
    if error > 1e-5:
        return f"torch.addmm into fp32 is off by {error:.1e} relative"
    return None


def _add_into_parameter(module: nn.Module, name: str, copy: torch.Tensor) -> None:
    """Hook after autograd accumulated `copy.grad`: move it into the fp32 parameter's grad."""
    grad = copy.grad
    copy.grad = None
    parameter = getattr(module, name)
    if grad is None or parameter is None or not parameter.requires_grad:
        return
    if parameter.grad is None:
        parameter.grad = grad.to(parameter.dtype)
    else:
        parameter.grad.add_(grad)  # fp32 += bf16 is computed in fp32


def eligible(module: nn.Module, skip: set[int]) -> bool:
    """Exactly nn.Linear (not a quantized or adapter subclass), fp32, not skipped."""
    return (
        type(module) is nn.Linear
        and module.weight.dtype == torch.float32
        and id(module) not in skip
        and id(module.weight) not in skip
    )


def not_for_copies(trainer: Any) -> str | None:
    """Why this trainer's set-up cannot take the copies, or None."""
    if getattr(trainer, "is_fsdp_enabled", False) or getattr(
        trainer, "is_deepspeed_enabled", False
    ):
        return "FSDP or DeepSpeed wraps the parameters"
    accelerator = getattr(trainer, "accelerator", None)
    if accelerator is not None and accelerator.num_processes > 1:
        return f"{accelerator.num_processes} processes reduce the parameters' own gradients"
    if getattr(getattr(trainer, "args", None), "n_gpu", 1) > 1:
        return "DataParallel over several GPUs replicates the layers"
    return None


def embeddings(model: nn.Module) -> list[nn.Module]:
    """The input embedding and the LM head, those that can be found."""
    getters = ("get_input_embeddings", "get_output_embeddings")
    return [module for get in getters if (module := found_module(model, get)) is not None]


def takes_fp8(name: str, module: nn.Module) -> bool:
    """An eligible layer the fp8Matmuls lever multiplies in fp8: big enough, not a LoRA
    adapter (peft's `lora_A`/`lora_B`/... under the layer it adapts), and its weight and
    bias both trainable or both frozen (one gradient path for the layer)."""
    bias = module.bias
    return (
        fits_fp8(module)
        and ".lora_" not in f".{name}"
        and (bias is None or bias.requires_grad == module.weight.requires_grad)
    )


class WeightCopies:
    """The copies of one model, and the callback that keeps them current during training.

    With `fp8` (the fp8Matmuls lever) the layers `takes_fp8` accepts keep fp8 copies of
    their weights instead (fp8_linear.py), and a trainable one adds its gradients into
    fp32 sums as the fused layers do; the others keep their bf16 copies.
    """

    def __init__(
        self, model: nn.Module, accumulate_in_matmul: bool = False, fp8: bool = False
    ) -> None:
        # The LM head (tied to the embedding or not): TRL's fused head and the lean head
        # read its weight directly, so a copy would never be used.
        skip: set[int] = set()
        sums: dict[int, GradSum] = {}
        for module in embeddings(model):
            skip.update((id(module), id(module.weight)))
        self.modules: list[nn.Linear] = []
        for qualified, module in model.named_modules():
            if not eligible(module, skip):
                continue
            if fp8 and takes_fp8(qualified, module):
                bias = module.bias
                copy = None if bias is None else bias.detach().to(COPY_DTYPE)
                module.register_buffer("bias_copy", copy, persistent=False)
                add_fp8_copies(module)
                if module.weight.requires_grad:
                    self._register_grad_sums(module, sums)
                else:  # frozen (a LoRA base layer): no gradient to keep
                    for slot in SLOTS:
                        module.register_buffer(f"{slot}_grad_sum", None, persistent=False)
                self.modules.append(module)
                continue
            for name in SLOTS:
                parameter = getattr(module, name)
                copy = None if parameter is None else parameter.detach().to(COPY_DTYPE)
                module.register_buffer(f"{name}_copy", copy, persistent=False)
            module.__class__ = LinearWithWeightCopies
            if accumulate_in_matmul and module.weight.requires_grad:
                # Layers frozen now keep the hook (a layer unfrozen later still learns).
                self._add_grad_sums(module, sums)
            self.modules.append(module)  # type: ignore[arg-type]
        names = {id(module): name for name, module in model.named_modules()}
        self.grad_sums = list(sums.values())
        for grad_sum in self.grad_sums:  # for messages: the name the model gives it
            module, slot = grad_sum.places[0]
            grad_sum.name = f"{names.get(id(module), '?')}.{slot}"
        self.hook_gradients()

    @staticmethod
    def _add_grad_sums(module: nn.Module, sums: dict[int, GradSum]) -> None:
        """Make `module` add its gradients into fp32 sums, one per parameter (shared with
        the layers already given the same parameter). A bias gets one even while frozen,
        so that it learns if it is unfrozen later."""
        module.__class__ = LinearAccumulatingInMatmul
        module.fp32_products = False  # set by use_weight_copies after its check
        WeightCopies._register_grad_sums(module, sums)

    @staticmethod
    def _register_grad_sums(module: nn.Module, sums: dict[int, GradSum]) -> None:
        for slot in SLOTS:
            parameter = getattr(module, slot)
            total = None
            if parameter is not None:
                shared = sums.get(id(parameter))
                if shared is None:
                    shared = sums[id(parameter)] = GradSum("", parameter, [])
                    total = torch.zeros_like(parameter, memory_format=torch.contiguous_format)
                else:
                    total = shared.total
                shared.places.append((module, slot))  # type: ignore[arg-type]
            module.register_buffer(f"{slot}_grad_sum", total, persistent=False)

    @property
    def layers(self) -> int:
        return len(self.modules)

    @property
    def fp8_layers(self) -> list[LinearInFp8]:
        return [module for module in self.modules if isinstance(module, LinearInFp8)]

    def pairs(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """(fp32 parameter, bf16 copy) of every weight and bias with one, looked up now
        (an fp8 layer's weight has fp8 copies instead)."""
        return [
            (getattr(module, name), copy)
            for module in self.modules
            for name in SLOTS
            if (copy := module._buffers.get(f"{name}_copy")) is not None
        ]

    def copies_bytes(self) -> int:
        """What the copies hold on the device (bf16 copies and fp8 copies)."""
        fp8 = sum(
            module.weight_fp8.numel() * 2 + module.weight_scale.numel() * 4
            for module in self.fp8_layers
        )
        return fp8 + sum(copy.numel() * copy.element_size() for _, copy in self.pairs())

    def hook_gradients(self) -> None:
        """Route each copy's gradient into its parameter; again at the start of training.

        Moving a module (`.to()`) puts new tensors in its buffers, made by an autograd op
        since the copies require grad: each is made a leaf again and hooked, else it would
        keep its gradient to itself while the parameter got none.
        """
        for module in self.modules:
            for name in SLOTS:
                key = f"{name}_copy"
                copy = module._buffers.get(key)
                if copy is None:
                    continue
                if copy.grad_fn is not None:
                    copy = module._buffers[key] = copy.detach()
                if not getattr(copy, "_sftjob_hooked", False):
                    # Hooked even while its parameter is frozen (a hook needs requires_grad;
                    # refresh sets it to the parameter's), in case it is unfrozen later.
                    copy.requires_grad_(True)
                    copy.register_post_accumulate_grad_hook(
                        partial(_add_into_parameter, module, name)
                    )
                    copy._sftjob_hooked = True  # type: ignore[attr-defined]
        for grad_sum in self.grad_sums:
            grad_sum.share()
        self.refresh()

    @torch.no_grad()
    def refresh(self, frozen_fp8: bool = True) -> None:
        """Round each fp32 parameter into its bf16 copy, in place (the buffers stay put),
        and each fp8 layer's weight into its fp8 copies (with `frozen_fp8`, the frozen
        ones too: after an optimizer step they have not changed).

        A copy needs a gradient exactly when its parameter does (a layer unfrozen during
        training gets one from its next micro-step on).
        """
        for parameter, copy in self.pairs():
            copy.copy_(parameter)
            copy.requires_grad_(parameter.requires_grad)
        for module in self.fp8_layers:
            if frozen_fp8 or module.weight_grad_sum is not None:
                refresh_fp8_copies(module)

    @torch.no_grad()
    def hand_over_grad_sums(self) -> None:
        """Zero each gradient sum and make it its trainable parameter's `.grad`.

        At train begin and after each step's zero_grad, which set `.grad` to None: the
        backward adds into the sums whether or not a parameter holds one.
        """
        for grad_sum in self.grad_sums:
            grad_sum.total.zero_()
            if grad_sum.parameter.requires_grad:
                grad_sum.parameter.grad = grad_sum.total

    @torch.no_grad()
    def check_grad_sums(self) -> None:
        """Before the optimizer step, each `.grad` is close to what plain autograd leaves.

        A parameter frozen since the hand-over gets `.grad` None, and so does one whose sum
        is all zeros: no backward reached it (a branch not taken), where plain autograd
        leaves None too, so the optimizer skips it rather than stepping with zeros. (An
        exact-zero gradient of a used layer is skipped as well: it would only have decayed
        AdamW's moments.) One unfrozen since the hand-over stays None and learns from the
        next step on. A `.grad` put there by anything else would be stepped with while
        the gradient sat in the sum: that stops the run. The clipped norm, computed
        before this, counted the gradient of a layer frozen during the step.
        """
        held = []
        for grad_sum in self.grad_sums:
            parameter = grad_sum.parameter
            if parameter.grad is grad_sum.total:
                if parameter.requires_grad:
                    held.append(grad_sum)
                else:
                    parameter.grad = None
            elif parameter.grad is not None:
                raise RuntimeError(
                    f"{grad_sum.name}: its .grad was replaced during the step, but "
                    "fuseGradientAccumulation (and fp8Matmuls) add the gradient into their "
                    "own buffer; set spec.training.speed.fuseGradientAccumulation and "
                    "fp8Matmuls: off for a training loop that manages .grad itself"
                )
        if not held:
            return
        # One norm per sum in a few fused kernels, read back once per step.
        norms = torch._foreach_norm([grad_sum.total for grad_sum in held])
        unused = (torch.stack([norm.to(norms[0].device) for norm in norms]) == 0).tolist()
        for grad_sum, empty in zip(held, unused, strict=True):
            if empty:
                grad_sum.parameter.grad = None

    def remove(self) -> None:
        """Plain nn.Linear layers again, without the copies (and gradients None, as after
        the last step's zero_grad)."""
        for grad_sum in self.grad_sums:
            if grad_sum.parameter.grad is grad_sum.total:
                grad_sum.parameter.grad = None
        self.grad_sums = []
        for module in self.modules:
            for name in SLOTS:
                module._buffers.pop(f"{name}_copy", None)
                module._buffers.pop(f"{name}_grad_sum", None)
            drop_fp8_copies(module)
            module.__dict__.pop("fp32_products", None)
            module.__class__ = nn.Linear
        self.modules = []

    def callback(self) -> Any:
        from transformers import TrainerCallback

        copies = self

        class KeepWeightCopiesCurrent(TrainerCallback):  # type: ignore[misc]
            # A resume loads the weights after the trainer was built, before this; the
            # optimizer changes them at each step; after training nothing refreshes them.
            def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                copies.hook_gradients()
                copies.hand_over_grad_sums()

            def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                copies.check_grad_sums()

            def on_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                copies.refresh(frozen_fp8=False)

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                copies.hand_over_grad_sums()  # after the step's zero_grad

            def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                copies.remove()

        return KeepWeightCopiesCurrent()


def use_weight_copies(trainer: Any, accumulate_in_matmul: bool = False, fp8: bool = False) -> str:
    """Give the trainer's model bf16 weight copies (whose backward adds the weight gradient
    into `.grad` inside the matmul, with `accumulate_in_matmul`), fp8 ones for the layers
    that take them with `fp8`; what was done, for the log."""
    refused = not_for_copies(trainer)
    if refused:
        return f"not applied: {refused}"
    if len(embeddings(trainer.model)) < 2:
        # The LM head must not get a copy (its weight is read directly): it must be found.
        return "not applied: the model's embeddings or LM head cannot be found"
    offloaded = bool(getattr(trainer.args, "activation_offloading", False))
    offloading = accumulate_in_matmul and offloaded
    if offloading:
        # Its saved-tensor hooks hand the backward new tensors. The sums are kept off the
        # saved tensors (checked eagerly and compiled on CPU with such hooks), but the
        # offloader together with a compiled GPU graph is not checked.
        accumulate_in_matmul = False
    fp8_offloaded = fp8 and offloaded
    if fp8_offloaded:
        # The offloader would move the fp8 inputs kept for the backward: not checked.
        fp8 = False
    copies = WeightCopies(trainer.model, accumulate_in_matmul=accumulate_in_matmul, fp8=fp8)
    if not copies.layers:
        return "no plain nn.Linear with fp32 weights: nothing to copy"
    trainer.add_callback(copies.callback())
    size = f"{copies.copies_bytes() / 2**30:.2f} GiB"
    if fp8:
        in_fp8 = len(copies.fp8_layers)
        done = (
            f"{copies.layers} linear layers compute with copies of their weights made once "
            f"per optimizer step ({size}): fp8Matmuls: {in_fp8} in fp8, "
            f"{copies.layers - in_fp8} in bf16"
        )
    else:
        done = (
            f"{copies.layers} linear layers compute with bf16 copies of their weights "
            f"({size}), made once per optimizer step"
        )
        if fp8_offloaded:
            done = f"{done}; fp8Matmuls: not applied with activation_offloading"
    fused = [m for m in copies.modules if isinstance(m, LinearAccumulatingInMatmul)]
    if offloading:
        return f"{done}; fuseGradientAccumulation: not applied with activation_offloading"
    if not accumulate_in_matmul:
        return done
    if not fused:
        if any(module.weight_grad_sum is not None for module in copies.fp8_layers):
            # The fp8 layers' products are fp32 and added into the sums anyway.
            return f"{done}; fuseGradientAccumulation: every trainable layer is in fp8"
        return f"{done}; fuseGradientAccumulation: no trainable layer to fuse"
    why_not = matmul_adds_in_fp32(fused[0].weight.device)
    for module in fused:
        module.fp32_products = why_not is None
    how = (
        "added into the fp32 .grad inside the matmul (fp32 output, beta 1)"
        if why_not is None
        else f"bf16 products added into the fp32 .grad, autocast's arithmetic ({why_not})"
    )
    return f"{done}; fuseGradientAccumulation: {len(fused)} layers' weight gradients {how}"


def probe_weight_copies(device: str, accumulate_in_matmul: bool = False) -> str | None:
    """Two linear layers with the copies against plain autocast on a few tensors.

    The output and the fp32 gradients must be bit for bit autocast's; with
    `accumulate_in_matmul` where the product is added in fp32 (CUDA), within the bf16
    activations' error instead. None when they agree, else the first difference.
    """
    import copy

    generator = torch.Generator().manual_seed(0)
    plain = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4))
    with torch.no_grad():
        for parameter in plain.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    plain = plain.to(device)
    ours = copy.deepcopy(plain)
    x = torch.randn(5, 16, generator=generator).to(device)
    copies = WeightCopies(ours, accumulate_in_matmul=accumulate_in_matmul)
    fp32_products = False
    if accumulate_in_matmul:
        fp32_products = matmul_adds_in_fp32(torch.device(device)) is None
        for module in copies.modules:
            module.fp32_products = fp32_products  # type: ignore[attr-defined]
        copies.hand_over_grad_sums()
    try:
        outputs = []
        for model in (plain, ours):
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
                out = model(x)
            out.float().square().sum().backward()
            outputs.append(out.detach())
        pairs = [("output", outputs[1], outputs[0])] + [
            (name, mine.grad, theirs.grad)
            for (name, theirs), mine in zip(
                plain.named_parameters(), ours.parameters(), strict=True
            )
        ]
        for name, mine, theirs in pairs:
            if mine is None or theirs is None:
                return f"{name}: no gradient"
            if fp32_products and name != "output":
                if not torch.allclose(mine, theirs, rtol=2e-2, atol=1e-3):
                    return f"{name}: off by {(mine - theirs).abs().max().item():.1e}"
            elif not torch.equal(mine, theirs):
                return f"{name}: not bit for bit autocast's"
        return None
    finally:
        copies.remove()


def probe_fp8_copies(device: str) -> str | None:
    """Two layers given fp8 copies (as `WeightCopies(fp8=True)` gives them) against fp64
    on a few tensors: their output and gradients must be within fp8's rounding (15% of
    the norm; 5-8% measured on CPU). None when they are, else the first that is not, or
    why `_scaled_mm` does not run here (a GPU without fp8 tensor cores)."""
    generator = torch.Generator().manual_seed(0)
    layers = nn.Sequential(nn.Linear(128, 256), nn.Linear(256, 128))
    with torch.no_grad():
        for parameter in layers.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    exact = [p.detach().double().requires_grad_() for p in layers.parameters()]
    x = torch.randn(40, 128, generator=generator)  # 40 rows: the padding is exercised
    reference = F.linear(F.linear(x.double(), exact[0], exact[1]), exact[2], exact[3])
    reference.square().sum().backward()
    layers = layers.to(device)
    copies = WeightCopies(layers, fp8=True)
    if len(copies.fp8_layers) != 2:
        return f"{len(copies.fp8_layers)} of the 2 layers were given fp8 copies"
    copies.hand_over_grad_sums()
    try:
        out = layers(x.to(device))
        out.float().square().sum().backward()
    except (RuntimeError, NotImplementedError) as error:
        return f"torch._scaled_mm failed on {device}: {str(error).splitlines()[0]}"
    pairs = [("output", out.detach(), reference.detach())] + [
        (f"gradient {i}", parameter.grad, want.grad)
        for i, (parameter, want) in enumerate(zip(layers.parameters(), exact, strict=True))
    ]
    try:
        for name, mine, theirs in pairs:
            if mine is None:
                return f"{name}: none"
            error = ((mine.double().cpu() - theirs).norm() / theirs.norm()).item()
            if not error <= 0.15:
                return f"{name}: off by {error:.1%} of its norm"
        return None
    finally:
        copies.remove()
