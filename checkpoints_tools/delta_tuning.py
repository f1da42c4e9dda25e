"""Delta tuning of an exported model: one call turns a transformers sequence classifier into the
model a method trains, with exactly that method's parameters left trainable.

What to call::

    model = AutoModelForSequenceClassification.from_pretrained(hf_dir, num_labels=N)
    tuned = delta_model(model, "lora")       # any of METHODS; peft methods return a PeftModel
    trainable, total = count_parameters(tuned)

``METHODS``: ``full`` (everything), ``lora``, ``prefix``, ``prompt``, ``ia3`` (peft, with the
classification head in ``modules_to_save``), ``bitfit`` (every bias + the head) and ``adapters``
(Houlsby bottleneck adapters: :func:`add_bottleneck_adapters`, + the head). The target modules per
transformers ``model_type`` (``xlm-roberta``, ``llama``) are in ``TARGETS``. Raises ``ValueError``
(one line naming the method and the rule) for an unknown method or model type, and for
``bitfit`` on a model without biases (Llama has none); ``prefix`` on Llama fails at the first
forward in peft 0.21 with transformers 5 ("Model does not support past key values": peft looks
for the ``past_key_values`` argument that transformers renamed ``cache``; peft's body-only path
on ``LlamaModel`` runs but its prefix never reaches the attention: a silent no-op, so it is not
used). On XLM-R the prefix goes on the body through that path, where it does reach it.

Why our own adapters: peft (0.21) has no bottleneck adapter (``adaption_prompt`` is
LLaMA-Adapter, a gated prompt). :class:`BottleneckAdapter` is Houlsby et al. (2019): after the
attention output projection and after the FFN output projection of each block, before the
residual add, ``h + W_up(gelu(W_down(h)))`` with ``W_up`` zero at the start (the model starts as
the pretrained one). Houlsby also trains the layer norms; here only the adapters and the head
train, so the count stays the adapters' own.
"""

from __future__ import annotations

import re

import torch
from torch import nn

METHODS = ("full", "lora", "prefix", "prompt", "ia3", "bitfit", "adapters")
HEADS = ("classifier", "score")  # XLMRobertaForSequenceClassification, LlamaForSequenceClassif.

# model_type -> what each method targets (regexes are matched with re.fullmatch on module names)
TARGETS = {
    "xlm-roberta": {
        "lora": ["query", "value"],
        "ia3": r".*\.(key|value|layer\.\d+\.output\.dense)",
        "ia3_feedforward": r".*layer\.\d+\.output\.dense",
        "adapters": r".*\.(attention\.output\.dense|layer\.\d+\.output\.dense)",
    },
    "llama": {
        "lora": ["q_proj", "v_proj"],
        "ia3": r".*\.(k_proj|v_proj|down_proj)",
        "ia3_feedforward": r".*\.down_proj",
        "adapters": r".*\.(self_attn\.o_proj|mlp\.down_proj)",
    },
}


class BottleneckAdapter(nn.Module):
    """``base(x) + up(gelu(down(base(x))))``: a frozen linear layer followed by a residual
    bottleneck of width ``bottleneck`` (``up`` starts at zero, so the output starts as
    ``base``'s). Input ``x_BTI``, output ``y_BTO`` (``O = base.out_features``)."""

    def __init__(self, base: nn.Linear, *, bottleneck: int) -> None:
        super().__init__()
        self.base = base
        self.adapter_down = nn.Linear(base.out_features, bottleneck)
        self.adapter_up = nn.Linear(bottleneck, base.out_features)
        nn.init.normal_(self.adapter_down.weight, std=1e-2)
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x_BTI: torch.Tensor) -> torch.Tensor:
        h_BTO = self.base(x_BTI)
        return h_BTO + self.adapter_up(nn.functional.gelu(self.adapter_down(h_BTO)))


def add_bottleneck_adapters(model: nn.Module, *, pattern: str, bottleneck: int = 16) -> list[str]:
    """Wrap every ``nn.Linear`` whose name fully matches ``pattern`` in a
    :class:`BottleneckAdapter`; returns the wrapped names. Raises ``ValueError`` when none
    matches."""
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and re.fullmatch(pattern, name)
    ]
    if not names:
        raise ValueError(f"adapters: pattern ({pattern!r}) must match at least one nn.Linear")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, BottleneckAdapter(getattr(parent, child), bottleneck=bottleneck))
    return names


def _is_head(name: str) -> bool:
    return name.split(".")[0] in HEADS


def delta_model(
    model: nn.Module,
    method: str,
    *,
    rank: int = 8,
    virtual_tokens: int = 8,
    bottleneck: int = 16,
) -> nn.Module:
    """``model`` (a transformers ``*ForSequenceClassification``) prepared for ``method``: the
    model to train, whose trainable parameters are exactly the method's (+ the head unless
    ``full``). ``rank``: LoRA rank; ``virtual_tokens``: prefix / prompt length; ``bottleneck``:
    adapter width. peft methods wrap (``PeftModel``); ``full``, ``bitfit`` and ``adapters`` change
    ``model`` in place and return it.

    Raises:
        ValueError: an unknown method or model type; ``bitfit`` on a model without biases; the
            peft error (one line) where peft refuses the model.
    """
    if method not in METHODS:
        raise ValueError(f"method ({method!r}) must be one of {', '.join(METHODS)}")
    model_type = model.config.model_type
    if model_type not in TARGETS and method not in ("full", "bitfit"):
        raise ValueError(
            f"{method}: model_type ({model_type!r}) must be one of {', '.join(TARGETS)}"
        )
    if method == "full":
        model.requires_grad_(True)
        return model
    if method == "bitfit":
        names = [n for n, _ in model.named_parameters() if n.endswith(".bias") and not _is_head(n)]
        if not names:
            raise ValueError(f"bitfit: the {model_type} body must have bias parameters (none)")
        for name, param in model.named_parameters():
            param.requires_grad_(name.endswith(".bias") or _is_head(name))
        return model
    if method == "adapters":
        model.requires_grad_(False)
        add_bottleneck_adapters(
            model, pattern=TARGETS[model_type]["adapters"], bottleneck=bottleneck
        )
        for name, param in model.named_parameters():
            param.requires_grad_(".adapter_" in name or _is_head(name))
        return model
    import peft

    targets = TARGETS[model_type]
    if method == "lora":
        config = peft.LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=targets["lora"], task_type="SEQ_CLS"
        )
    elif method == "ia3":
        config = peft.IA3Config(
            target_modules=targets["ia3"],
            feedforward_modules=targets["ia3_feedforward"],
            task_type="SEQ_CLS",
        )
    elif method == "prefix":
        config = peft.PrefixTuningConfig(num_virtual_tokens=virtual_tokens, task_type="SEQ_CLS")
        if model_type == "xlm-roberta":
            return _prefix_on_body(model, config)
    else:
        config = peft.PromptTuningConfig(num_virtual_tokens=virtual_tokens, task_type="SEQ_CLS")
    return peft.get_peft_model(model, config)


def _prefix_on_body(model: nn.Module, config) -> nn.Module:
    """Prefix tuning of an XLM-R classifier: peft's classifier path looks for a
    ``past_key_values`` argument that transformers 5 renamed ``cache``, so the prefix goes on the
    body (``roberta``, peft's feature-extraction path, whose prefix the body consumes) and the
    head trains beside it."""
    import peft

    config.task_type = "FEATURE_EXTRACTION"
    model.requires_grad_(False)
    model.roberta = peft.get_peft_model(model.roberta, config)
    for name, param in model.named_parameters():
        param.requires_grad_("prompt_encoder" in name or _is_head(name))
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts of ``model``, each tensor once (peft's frozen
    ``original_module`` copy of a saved head is counted in ``total``)."""
    seen: set[int] = set()
    trainable = total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total
