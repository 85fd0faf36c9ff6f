"""Chat conversations → prompt text, the way Qwen3 expects them."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Any

from qwen3c.errors import RequestError
from qwen3c.runtime.tokenizer import Tokenizer

_THINK_BLOCK = re.compile(r"<think>.*?</think>\s*", re.DOTALL)


def strip_thinking(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop ``<think>...</think>`` from earlier assistant turns: Qwen3 was trained without them
    in the history, and answers come out cut short when they stay."""
    return [{**m, "content": _THINK_BLOCK.sub("", m["content"])}
            if m.get("role") == "assistant" and isinstance(m.get("content"), str) else m
            for m in messages]


def chat_prompt(tokenizer: Tokenizer | None, messages: list[dict[str, Any]], *,
                enable_thinking: bool = True, **template_options: Any) -> str:
    if tokenizer is None:
        raise RequestError("this artifact has no tokenizer files, so no chat template")
    if not messages:
        raise RequestError("messages must not be empty")
    return tokenizer.apply_chat_template(strip_thinking(messages),
                                         enable_thinking=enable_thinking, **template_options)


def interactive_chat(model, *, params, max_tokens: int, enable_thinking: bool,
                     read: Callable[[], str | None], write: Callable[[str], None]) -> None:
    """A terminal conversation: each answer streams as it is generated; the history (without
    thinking blocks) is the context of the next turn. Ends on EOF or ``/exit``."""
    from qwen3c.runtime.engine import Engine, Request

    engine = Engine(model)
    engine.start()
    history: list[dict[str, Any]] = []
    try:
        while (line := read()) is not None and line.strip() != "/exit":
            if not line.strip():
                continue
            history.append({"role": "user", "content": line})
            prompt = chat_prompt(model.tokenizer, history, enable_thinking=enable_thinking)
            answer: list[str] = []
            finished = threading.Event()

            def on_event(event, answer=answer, finished=finished) -> None:
                write(event.text)
                answer.append(event.text)
                if event.finish_reason:
                    if event.error:
                        write(f"\n[error: {event.error}]")
                    finished.set()

            engine.submit(Request(model.checked_ids(model.encode(prompt)), max_tokens, params,
                                  on_event))
            finished.wait()
            write("\n")
            history.append({"role": "assistant", "content": "".join(answer)})
    finally:
        engine.stop()
