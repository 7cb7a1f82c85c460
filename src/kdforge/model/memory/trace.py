"""Memory of any local causal LM (`model.path`): built on fake tensors and traced.

The formula of `estimate` holds for the Llama-shaped student kdforge builds; here a model of any
family is built from its own config.json and one fake forward is traced (see below).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

from kdforge.model.memory.estimate import DTYPE_BYTES, Setup, _alternatives, _Totals

# For a `model.path` model of any family (GPT-2's Conv1D, Phi's biases, Gemma-2's soft-capping, a
# mixture of experts) the layer formula above does not apply. Instead the model is built from its
# own config.json under torch's FakeTensorMode (shapes and dtypes, no memory, no compute) with the
# LoRA the trainer would add, so the parameter counts are exact; one forward of a fake
# micro-batch runs under autograd's saved-tensor hooks, so the activations are what this
# architecture saves at these shapes, storage by storage. The transient terms of the backward
# (logits, the loss backward's fp32 V-wide buffers, the gradients alive in one layer) and the
# gradient checkpointing case are composed from that trace as in the formula above.


@dataclass(frozen=True)
class Traced:
    """What one fake forward of a `model.path` model at micro-batch x seq_len showed (bytes)."""

    model_type: str
    n_layers: int
    d_model: int
    ffn_dim: int
    vocab_size: int
    params: int  # base parameters (adapters excluded)
    trainable: int
    weight_bytes: int  # all parameters, adapters included, in their own dtypes
    trainable_bytes: int
    trainable_dtype: str
    targets: tuple[str, ...]  # LoRA's resolved target modules (empty: full training)
    saved_layers: int  # saved for backward before the output head (embeddings, decoder layers, final norm)
    saved_head: int  # saved from the output head on (lm_head input, soft-capping, the loss)
    logits: int  # the logits tensor the model output keeps alive, when autograd did not save it


@contextmanager
def _as_in_eager_mode():
    """Make transformers take, on fake tensors, the paths it takes on real ones: a fake tensor
    position ids read as "tracing" to the mask code, which then takes the rows for packed
    sequences and builds an s x s mask that a real run of unpacked rows leaves to sdpa's is_causal; and fake tensors have no float32 grouped_mm (its meta kernel
    wants bf16), so a mixture of experts goes through its fallback op, which saves the same
    input and weight."""
    import importlib

    patches = []
    for module, name, value in (("transformers.masking_utils", "find_packed_sequence_indices", lambda *a, **k: None),
                                ("transformers.integrations.moe", "_can_use_grouped_mm", lambda *a, **k: False)):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        if not hasattr(mod, name):
            continue
        orig = getattr(mod, name)
        patches.append((mod, name, orig))
        setattr(mod, name, value)
    try:
        yield
    finally:
        for mod, name, orig in patches:
            setattr(mod, name, orig)


def _to_fake(model) -> None:
    """Replace the meta parameters and buffers of `model` by fake CPU tensors (called inside a
    FakeTensorMode), one new parameter per old one so tied weights stay tied."""
    import torch

    new: dict[int, torch.Tensor] = {}
    for mod in model.modules():
        for table, wrap in ((mod._parameters, True), (mod._buffers, False)):
            for k, t in table.items():
                if t is None:
                    continue
                if id(t) not in new:
                    fake = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu")
                    new[id(t)] = torch.nn.Parameter(fake, requires_grad=t.requires_grad) if wrap else fake
                table[k] = new[id(t)]


def _ffn_dim(conf) -> int:
    return getattr(conf, "intermediate_size", None) or getattr(conf, "n_inner", None) or 4 * conf.hidden_size


def trace_model(path, setup: Setup, lora_targets: list[str] | None = None, lora_alpha: float = 16,
                conf=None) -> Traced:
    """Build the model at `path` (a Hugging Face folder) on fake tensors with `setup`'s dtype,
    attention and LoRA (targets None: PEFT's all-linear, as the trainer does) and trace one
    forward of a micro-batch of `setup.micro_batch` x `setup.seq_len` tokens. `conf`: the
    folder's transformers config when the caller has loaded it already."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AutoModelForCausalLM

    conf = conf if conf is not None else hf_config(path)
    dtype = getattr(torch, setup.dtype)
    # Built on the meta device (PEFT cannot move fake parameters), then every tensor swapped for
    # a fake CPU one, so the forward dispatches to the CPU kernels' shape functions (sdpa's
    # flash kernel saves its output and logsumexp, not the probabilities).
    # sdpa: the family's default attention, as training loads it (Gemma-2's is eager)
    attn = {"attn_implementation": "eager"} if setup.attention == "eager" else {}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(conf, dtype=dtype, trust_remote_code=False, **attn)
    params = sum(p.numel() for p in model.parameters())
    targets: tuple[str, ...] = ()
    if setup.lora is not None:
        from kdforge.model.adapters import with_lora
        from kdforge.model.student import peft_lora_config

        model = with_lora(model, peft_lora_config(setup.lora.r, lora_alpha, setup.lora.dropout,
                                                  lora_targets))
        adapter = model.peft_config["default"]
        targets = (tuple(sorted(adapter.target_modules or ()))
                   + tuple(sorted(getattr(adapter, "target_parameters", None) or ())))
    model.train()
    with FakeTensorMode(allow_non_fake_inputs=True), _as_in_eager_mode():
        _to_fake(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        param_storages = {p.untyped_storage()._cdata for p in model.parameters()}
        saved: dict[int, int] = {}
        head_from = [None]

        def pack(t):
            key = t.untyped_storage()._cdata
            if key not in param_storages and key not in saved:
                saved[key] = t.untyped_storage().nbytes()
            return t

        def mark(*_):
            if head_from[0] is None:
                head_from[0] = len(saved)

        hook = model.get_output_embeddings().register_forward_pre_hook(mark)
        ids = torch.randint(0, conf.vocab_size, (setup.micro_batch, setup.seq_len))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(input_ids=ids, labels=ids, use_cache=False)
        hook.remove()
        sizes = list(saved.values())
        cut = head_from[0] if head_from[0] is not None else len(sizes)
        out_logits = out.logits
        logits = 0 if out_logits.untyped_storage()._cdata in saved else out_logits.untyped_storage().nbytes()
        trainable_dtype = str(trainable[0].dtype).removeprefix("torch.") if trainable else setup.dtype
        return Traced(
            model_type=conf.model_type, n_layers=conf.num_hidden_layers, d_model=conf.hidden_size,
            ffn_dim=_ffn_dim(conf), vocab_size=conf.vocab_size, params=params,
            trainable=sum(p.numel() for p in trainable),
            weight_bytes=weight_bytes, trainable_bytes=sum(p.numel() * p.element_size() for p in trainable),
            trainable_dtype=trainable_dtype, targets=targets, saved_layers=sum(sizes[:cut]), saved_head=sum(sizes[cut:]),
            logits=logits)


@dataclass(frozen=True)
class ModelEstimate(_Totals):
    """`Estimate`'s numbers for a traced `model.path` model (all activation terms in bytes for
    the whole micro-batch)."""

    traced: Traced
    setup: Setup
    name: str = "model"

    @property
    def params(self) -> int:
        return self.traced.params

    @property
    def trainable(self) -> int:
        return self.traced.trainable

    @property
    def weights(self) -> int:
        return self.traced.weight_bytes

    @property
    def _tb(self) -> int:
        return DTYPE_BYTES[self.traced.trainable_dtype]

    @property
    def master(self) -> int:
        return self.trainable * 4 if self.setup.master_weights and self._tb < 4 else 0

    @property
    def gradients(self) -> int:
        return self.traced.trainable_bytes

    @property
    def optimizer(self) -> int:
        moment_bytes = DTYPE_BYTES[self.setup.optimizer_dtype] if self.setup.optimizer_dtype else self._tb
        return self.trainable * 2 * moment_bytes

    @property
    def tokens(self) -> int:
        return self.setup.micro_batch * self.setup.seq_len

    @property
    def ce_backward(self) -> int:
        return self.tokens * 8 * self.traced.vocab_size

    @property
    def layer_backward(self) -> int:
        act_bytes = DTYPE_BYTES[self.setup.dtype]
        return self.tokens * (2 * act_bytes * self.traced.ffn_dim + act_bytes * self.traced.d_model)

    @property
    def checkpoint(self) -> int:
        return self.tokens * self.traced.n_layers * DTYPE_BYTES[self.setup.dtype] * self.traced.d_model

    @property
    def activations(self) -> int:
        traced = self.traced
        head = traced.saved_head + self.ce_backward
        if self.setup.gradient_checkpointing:
            one_layer = traced.saved_layers // max(traced.n_layers, 1)
            return self.checkpoint + traced.logits + max(head, one_layer + self.layer_backward)
        return traced.saved_layers + traced.logits + max(head, self.layer_backward)


def hf_config(path):
    """The transformers config of the Hugging Face folder at `path` (its config.json)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path), trust_remote_code=False)


def lora_field(e: Exception) -> str:
    """The config field a PEFT refusal to build the adapter is about."""
    return "model.lora.dropout" if "lora_dropout" in str(e) else "model.lora.target_modules"


def estimate_model(path, setup: Setup, lora_targets: list[str] | None = None, name: str = "model",
                   _cache: dict | None = None, conf=None) -> ModelEstimate:
    """Memory for training the `model.path` model at `path` as `setup` says (`conf`: its
    transformers config, when loaded already)."""
    key = (setup.dtype, setup.attention, setup.micro_batch, setup.seq_len,
           None if setup.lora is None else (setup.lora.r, setup.lora.dropout))
    cache = {} if _cache is None else _cache
    if key not in cache:
        cache[key] = trace_model(path, setup, lora_targets, conf=conf)
    return ModelEstimate(cache[key], setup, name)


def model_alternatives(path, setup: Setup, lora_targets: list[str] | None = None,
                       conf=None) -> list[tuple[str, ModelEstimate]]:
    """`alternatives` for a `model.path` model: its config.json read once for all the rows."""
    cache: dict = {}
    conf = conf if conf is not None else hf_config(path)
    return _alternatives(setup, lambda other: estimate_model(path, other, lora_targets if other.lora else None,
                                                             _cache=cache, conf=conf))
