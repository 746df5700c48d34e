"""GET /tokenizer/files and GET /tokenizer/files/{name}: the server's tokenizer as the
files `transformers` loads, its --chat-template included.

A client on another machine (RuntimeEndpoint) builds the very tokenizer the server uses
from them: it scores `select` choices on the token ids the server will see and renders
roles with the server's template, without any access to the server's model folder.

The files are the tokenizer as the server holds it (save_pretrained, not a copy of the
model folder), so a template given by flag is in them and no weight file ever is.
"""

from __future__ import annotations

import hashlib
import tempfile
import threading
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import Response

from loom.runtime.http.errors import APIError
from loom.runtime.http.frontend import Frontend


class TokenizerFiles:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._files: dict[str, bytes] | None = None
        self._lock = threading.Lock()

    def files(self) -> dict[str, bytes]:
        """name -> content; saved once, on first use (a few MB, ~0.1 s)."""
        with self._lock:
            if self._files is None:
                with tempfile.TemporaryDirectory(prefix="loom-tokenizer-") as tmp:
                    self.tokenizer.save_pretrained(tmp)
                    paths = sorted(p for p in Path(tmp).iterdir() if p.is_file())
                    self._files = {p.name: p.read_bytes() for p in paths}
            return self._files

    def listing(self) -> dict:
        return {
            "files": [
                {"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                for name, data in self.files().items()
            ]
        }


def add_tokenizer_routes(app: FastAPI, tokenizer, frontend: Frontend) -> None:
    tokenizer_files = TokenizerFiles(tokenizer)

    @app.get("/tokenizer/files")
    async def listing() -> dict:
        return await frontend.off_loop(tokenizer_files.listing)

    @app.get("/tokenizer/files/{name}")
    async def one_file(name: str) -> Response:
        files = await frontend.off_loop(tokenizer_files.files)
        if name not in files:
            raise APIError(
                404, f"the tokenizer has no file {name!r}; GET /tokenizer/files lists them"
            )
        return Response(files[name], media_type="application/octet-stream")
