"""Result rows of a worker: a generated text's row, or an error row naming why (rows, never exceptions)."""

from __future__ import annotations

from typing import Any

from cogbatch.inputs.pending import Request
from cogbatch.store.schema import make_row


def postprocess(text: str, strip_prefixes: tuple[str, ...]) -> str:
    """Trim, and drop a configured boilerplate opening such as 'The image shows'."""
    text = text.strip()
    for prefix in strip_prefixes:
        if text.lower().startswith(prefix.lower()):
            rest = text[len(prefix) :].lstrip(" ,:;-")
            text = rest[:1].upper() + rest[1:]
            break
    return text


def error_row(req: Request, reason: str, cfg: Any, run_id: str, img: Any = None) -> dict:
    """The row of a request that got no text (`cfg`: the JobConfig; `img`: the LoadedImage, when it decoded)."""
    return make_row(
        image_id=req.image.image_id,
        path=req.image.path,
        task=req.task.name,
        prompt=req.prompt,
        status="error",
        error=reason,
        width=img.width if img else None,
        height=img.height if img else None,
        model=cfg.model,
        quant=cfg.quantization.label(),
        fingerprint=req.fingerprint,
        run_id=run_id,
    )


def ok_row(req: Request, result: Any, cfg: Any, run_id: str, img: Any) -> dict:
    """The row of one finished generation (`result`: a `DecodeResult`)."""
    return make_row(
        image_id=req.image.image_id,
        path=req.image.path,
        task=req.task.name,
        prompt=req.prompt,
        text=postprocess(result.text, req.task.strip_prefixes),
        status="ok",
        finish_reason=result.finish_reason,
        tokens_in=result.prompt_tokens,
        tokens_out=len(result.token_ids),
        width=img.width,
        height=img.height,
        model=cfg.model,
        quant=cfg.quantization.label(),
        fingerprint=req.fingerprint,
        run_id=run_id,
        attempts=result.attempts,
    )
