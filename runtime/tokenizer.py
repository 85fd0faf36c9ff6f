"""Text ↔ token ids from the checkpoint's own tokenizer files (local only, never a hub call),
and its Jinja chat template rendered in a sandbox."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as FastTokenizer

from qwen3c.errors import RequestError


class Tokenizer:
    def __init__(self, directory: Path):
        self._tokenizer = FastTokenizer.from_file(str(directory / "tokenizer.json"))
        self.chat_template = _chat_template(directory)

    @classmethod
    def from_dir(cls, directory: Path) -> Tokenizer | None:
        return cls(directory) if (directory / "tokenizer.json").is_file() else None

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def token_text(self, token: int) -> str:
        """One token as text, special tokens included (for logprobs)."""
        return self._tokenizer.decode([token], skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict[str, str]], *,
                            add_generation_prompt: bool = True, **options: Any) -> str:
        """Render the conversation as the model was trained to see it (e.g. enable_thinking)."""
        if self.chat_template is None:
            raise RequestError("this model's tokenizer has no chat template")
        # The same environment HF renders templates in (loop controls included).
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent,
                                                                      ensure_ascii=False)
        env.globals["raise_exception"] = _raise_template_error
        try:
            template = env.from_string(self.chat_template)
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   **options)
        except TemplateError as bad:
            raise RequestError(f"chat template failed: {bad}") from None


def _chat_template(directory: Path) -> str | None:
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    config_file = directory / "tokenizer_config.json"
    if config_file.is_file():
        template = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, str):
            return template
    return None


def _raise_template_error(message: str) -> None:
    raise RequestError(f"chat template: {message}")
