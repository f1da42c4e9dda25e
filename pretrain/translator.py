"""Our own checkpoints as a back-translation backend: ``--translator ckpt:DIR``.

What to call: nothing directly; ``python -m data_pipeline backtranslate --translator ckpt:DIR
--to LANG ...`` finds :func:`checkpoint_translator` through the ``rosetta.translators`` entry
point (``setup.py``), since ``data_pipeline`` imports no model code. ``DIR`` is a complete
checkpoint of the trainer (``runs/x/checkpoints/step_N``) of an encoder-decoder trained with the
``translation`` objective: the source is ``text </s>`` in the run's tokenizer, the decoder starts
with ``<lang:LANG>`` (``--to``), decoding is ``pretrain.generate`` (greedy, beam or sampling as
``--decode`` says, max length ``a x source + b``). Guarantees: the same checkpoint, texts, decode
settings and seed give the same translations; provenance names the checkpoint's step, its
weights' sha256 and the tokenizer's.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from data_pipeline.tokenizer import sha256_file


class CheckpointTranslator:
    """A trainer checkpoint of an encoder-decoder, loaded on first use."""

    concurrent = False

    def __init__(self, directory: str, options: Any) -> None:
        from checkpoints_tools.dcp_io import open_checkpoint

        spec = f"ckpt:{directory}"
        if options.target is None:
            raise ValueError(f"--translator {spec!r} needs --to (the decoder's language token)")
        try:
            self._opened = open_checkpoint(directory)
        except ValueError as err:
            raise ValueError(f"--translator {spec!r}: {err}") from None
        if self._opened.model_cfg.family != "encoder_decoder":
            raise ValueError(
                f"--translator {spec!r}: model.family ({self._opened.model_cfg.family!r}) must "
                "be encoder_decoder"
            )
        self.directory = Path(directory)
        self.options = options
        self.name = f"ckpt:{self.directory.parent.parent.name}/{self.directory.name}"
        # streamed per file (sha256_file), then combined as the hf: backend combines its files
        weights = {p.name: sha256_file(p) for p in sorted(self.directory.glob("*.distcp"))}
        digest = hashlib.sha256("".join(f"{n} {d}\n" for n, d in weights.items()).encode())
        self._tokenizer = self._run_tokenizer()
        if options.target not in self._tokenizer.lang_ids:
            raise ValueError(
                f"--to {options.target}: the checkpoint's tokenizer has no <lang:{options.target}>"
            )
        self.settings = {
            "model_sha256": digest.hexdigest(),
            "tokenizer_sha256": self._tokenizer.model_sha256,
            "decode": options.decode.as_dict(),
            "max_len_a": options.max_len_a,
            "max_len_b": options.max_len_b,
            "target": options.target,
        }
        self._model = None

    def _run_tokenizer(self):
        from checkpoints_tools.convert import run_tokenizer

        return run_tokenizer(self._opened.cfg)

    def _load(self):
        import torch

        from pretrain.models import build_model

        if self.options.threads:
            torch.set_num_threads(self.options.threads)
        model = build_model(self._opened.model_cfg)
        model.load_state_dict(self._opened.load_model_state(), strict=True)
        self._model = model.float().eval()

    def translate(self, texts: list[str], *, seed: int = 0) -> list[str]:
        import torch

        from pretrain.generate import generate

        if self._model is None:
            self._load()
        tok = self._tokenizer
        eos, pad = tok.special_ids["eos"], tok.special_ids["pad"]
        sources = [ids + [eos] for ids in tok.encode(texts)]
        decode = self.options.decode
        kwargs: dict[str, Any] = {"decode": decode.mode}
        if decode.mode == "beam":
            kwargs["num_beams"] = decode.num_beams
        elif decode.mode == "sample":
            kwargs.update(
                top_k=decode.top_k, top_p=decode.top_p, temperature=decode.temperature, seed=seed
            )
        with torch.no_grad():
            outputs = generate(
                self._model,
                sources,
                decoder_start_id=tok.lang_ids[self.options.target],
                eos_id=eos,
                pad_id=pad,
                max_len_a=self.options.max_len_a,
                max_len_b=self.options.max_len_b,
                **kwargs,
            )
        return [tok.decode([i for i in ids if i != eos]).strip() for ids in outputs]


def checkpoint_translator(directory: str, options: Any) -> CheckpointTranslator:
    """The ``rosetta.translators`` entry point ``ckpt``."""
    return CheckpointTranslator(directory, options)
