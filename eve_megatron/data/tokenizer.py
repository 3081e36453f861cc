"""Text tokenizers: a local Hugging Face tokenizer folder or a sentencepiece ``.model``.

Only what preprocessing needs: ``encode`` without any automatically added special
tokens (templates add what they need), ``token_id`` for special tokens, ``decode``.
"""

from __future__ import annotations

import os
from typing import List, Optional


class Tokenizer:
    """Common interface of the tokenizers below."""

    path: str
    vocab_size: int

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text``; special-token strings in it map to their single id."""
        raise NotImplementedError

    def decode(self, ids: List[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; ``skip_special_tokens`` drops special tokens (``<|im_end|>``...)."""
        raise NotImplementedError

    def token_id(self, token: str) -> Optional[int]:
        """Id of ``token`` when it is a single token of the vocabulary, else None."""
        ids = self.encode(token)
        return ids[0] if len(ids) == 1 else None


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer folder (``tokenizer.json`` read with ``tokenizers``;
    folders without it go through ``transformers.AutoTokenizer``, offline)."""

    def __init__(self, path: str) -> None:
        self.path = path
        tj = os.path.join(path, "tokenizer.json")
        if os.path.isfile(tj):
            from tokenizers import Tokenizer as _Fast

            self._fast = _Fast.from_file(tj)
            self._slow = None
            self.vocab_size = self._fast.get_vocab_size(with_added_tokens=True)
        else:
            from transformers import AutoTokenizer

            self._fast = None
            try:
                self._slow = AutoTokenizer.from_pretrained(path, local_files_only=True)
            except Exception as exc:  # transformers raises many kinds, naming no path
                raise ValueError(f"tokenizer folder {path} holds no usable tokenizer (no "
                                 f"tokenizer.json; transformers: {type(exc).__name__}: "
                                 f"{str(exc)[:300]})") from None
            self.vocab_size = len(self._slow)

    def encode(self, text: str) -> List[int]:
        if self._fast is not None:
            return self._fast.encode(text, add_special_tokens=False).ids
        return self._slow.encode(text, add_special_tokens=False)

    def decode(self, ids: List[int], skip_special_tokens: bool = False) -> str:
        if self._fast is not None:
            return self._fast.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return self._slow.decode(list(ids), skip_special_tokens=skip_special_tokens)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``.model`` file (user-defined symbols encode as one piece). Each
    ``encode`` call is one ``SentencePieceProcessor.encode`` (a dummy prefix when the model
    adds one, as Llama's does); control symbols (``<s>``, ``</s>``) are found by
    :meth:`token_id`, never in text, as with the slow HF Llama tokenizer's special tokens."""

    def __init__(self, path: str) -> None:
        import sentencepiece as spm

        self.path = path
        self._sp = spm.SentencePieceProcessor(model_file=path)
        self.vocab_size = self._sp.get_piece_size()

    def encode(self, text: str) -> List[int]:
        return list(self._sp.encode(text))

    def decode(self, ids: List[int], skip_special_tokens: bool = False) -> str:
        if skip_special_tokens:
            ids = [i for i in ids if not (self._sp.is_control(i) or self._sp.is_unknown(i))]
        return self._sp.decode(list(ids))

    def token_id(self, token: str) -> Optional[int]:
        pid = self._sp.piece_to_id(token)
        return None if pid == self._sp.unk_id() and token != self._sp.id_to_piece(pid) else pid


def load_tokenizer(path: str) -> Tokenizer:
    """Load a tokenizer from a local HF folder or a sentencepiece ``.model`` file. A folder
    with a ``tokenizer.model`` but no ``tokenizer.json`` (a Llama/Vicuna or EVEv1 release
    folder) is read as that sentencepiece model: the slow tokenizer's (``use_fast=False``)
    semantics, pad = unk 0, bos 1, eos 2."""
    if os.path.isdir(path):
        model = os.path.join(path, "tokenizer.model")
        if os.path.isfile(model) and not os.path.isfile(os.path.join(path, "tokenizer.json")):
            return SentencePieceTokenizer(model)
        return HFTokenizer(path)
    if os.path.isfile(path) and path.endswith(".model"):
        return SentencePieceTokenizer(path)
    raise ValueError(f"tokenizer {path!r} is neither a Hugging Face tokenizer folder "
                     "nor a sentencepiece .model file")
